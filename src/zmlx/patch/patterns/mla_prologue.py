"""mla_prologue: the attention half of a decoder layer at decode with its first seven stock
launches fused into two, every value stock's (close; exact on CUDA and the CPU).

Patches the decoder layer (on glm4_moe_lite: `Glm4MoeLiteDecoderLayer`) as the attention half
of zmlx.patch.layer's shared `__call__`, like mla_block (moe_block supplies the MoE half; on a
layer both patch, the two halves run together). A decode step with mlx-lm's plain `KVCache`
and no mask (or zmlx's StaticMLACache, also inside compiled_decode's traced step) runs

    norm_qkv_a        input_layernorm + q_a_proj + kv_a_proj_with_mqa, one pass over the row
    mla_q_prep_nope   q_a_layernorm + q_b_proj + rope of q_pe and its scale; kv_a_layernorm +
                      rope of k_pe (nn.RoPE, or the DeepSeek-V3 family's YaRN as glm47_rope
                      takes it): q_nope, q_pe * scale, kv_latent, k_pe, each as stock rounds it

and then mlx-lm's own ops in mlx-lm's order: the cache update, the rope scores, the mask,
embed_q, scaled_dot_product_attention, unembed_out, the reshape and o_proj (the residual add
is the MoE half's). With quant.QMM_ORDER, where stock's embed_q runs qmm_sm80 and its
attention MLX's fallback (on CUDA and the CPU: the rope scores are an array mask), the second launch is
mla_q_prep_embed instead: embed_q in qmm_sm80's order and SDPA's query scale in it, the
fallback's remaining ops run here (`_attention_after_scale`): two stock launches fewer.
Both launches are bitwise stock on CUDA (MLX's rms_norm, qmv/gemv, qmm_sm80 and rope orders,
one sequence; more take mlx-lm's attention) and run their references, stock's op sequence,
on the CPU; on Metal their dots are float32 sums (close). Launches prepared as
mla_block's (zmlx.patch.mla_layer). Prompts, masked steps, other caches and layers whose
launches skip (why: `decode_plan`) run mlx-lm's attention, with the attention patterns that
patched it. mla_block does all this and the attention itself, so this pattern yields to it;
and to mla_attention, whose attention kernels it would bypass. residual_norm yields to it
(its model loop goes around the layers).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention

from zmlx.kernels.mla_q_prep import mla_q_prep_nope
from zmlx.kernels.mla_q_prep_embed import mla_q_prep_embed
from zmlx.kernels.norm_qkv_a import norm_qkv_a
from zmlx.kernels.prepared import Prepared
from zmlx.patch import mla_layer
from zmlx.patch.attention import mla_rope_reason
from zmlx.patch.layer import make
from zmlx.patch.layer import registry as layer_registry
from zmlx.patch.mla_layer import Front, QPrep, Stock
from zmlx.patch.pattern import Pattern


def check(layer, params) -> str | None:
    # embed_q, unembed_out and o_proj stay mlx-lm's modules: any quantization they have
    return mla_layer.layer_reason(layer, mla_rope_reason)


def _weights(layer) -> tuple:
    """Every array the two launches and the compiled tail read (mla_layer.weights)."""
    return mla_layer.weights(layer, ("q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "embed_q", "unembed_out"))


# Where stock's decode attention is MLX's fallback (the ops of `_attention_after_scale`): with
# mlx-lm's rope scores as an array mask MLX 0.32's CUDA SDPA takes neither cuDNN
# (`use_cudnn_for_decoding`: no array mask) nor its vector kernel (no array mask), whatever
# the width; its CPU backend always runs the fallback. Metal's is not known: not there.
FALLBACK_BACKENDS = ("cpu", "cuda")
# Whether those steps' tail runs compiled (`_compiled_tail`); off: the same ops built eagerly
# each step (benchmarks/gpu/profile_host.py --ab tail times one against the other). Off: the
# default preset's first ledger line with it on (bc9385fb75, dd92baa) ran 141 more kernels a
# token (3 a layer, as many as the tail's matmuls) and issued 4 ms slower than the last one
# without it (aa96ba9e27, f868a18), where it was predicted to add none and save 0.1-0.3 ms.
# MLX's source says why: in a shapeless trace matmul broadcasts both operands, which gives the
# M = 1 row a zero stride, and the CUDA Matmul copies such an operand (NOTEBOOK, 2026-12-01,
# thirteenth session).
COMPILE_TAIL = False


def _attention_after_scale(q_s, kv, mask):
    """MLX's scaled_dot_product_attention fallback after its first op (q times T(scale): the
    launch's q_s), with keys = values = kv (B, 1, S, rank) and an additive mask: its ops in its
    order, so the values are stock's wherever stock runs the fallback."""
    heads = q_s.shape[1]
    k = v = kv
    if heads > 1:  # one latent head: the queries' heads as repeats of it
        q_s = mx.unflatten(q_s, 1, (1, heads))
        k, v = mx.expand_dims(kv, 2), mx.expand_dims(kv, 2)
        mask = mx.unflatten(mask, -3, (1, heads))
    scores = mx.add(mx.matmul(q_s, mx.swapaxes(k, -1, -2)), mask)
    out = mx.matmul(mx.softmax(scores, axis=-1, precise=True), v)
    return mx.flatten(out, 1, 2) if heads > 1 else out


def _compiled_tail(unembed_out):
    """The step after the cache update where the second launch is mla_q_prep_embed and there is
    no mask, up to o_proj: the rope scores, `_attention_after_scale`, unembed_out and the heads'
    merge, as one function compiled once (shapeless: the cache's length changes each step), so
    that MLX replays its ops instead of Python building them each step. Its primitives are the
    eager ops' (mx.compile fuses no single elementwise op; the merge is mx.flatten, which takes
    no shape, where mlx-lm reshapes), so its values are theirs. o_proj stays outside: a sharded
    model's o_proj sums over its ranks, which a shapeless function cannot hold. It holds
    unembed_out (not the layer); the block is prepared again when its arrays change (`_weights`)."""

    def tail(q_s, q_pe, kv_latent, k_pe):
        pe_scores = q_pe @ k_pe.swapaxes(-1, -2)
        output = unembed_out(_attention_after_scale(q_s, kv_latent, pe_scores))
        return mx.flatten(output.transpose(0, 2, 1, 3), -2, -1)

    return mx.compile(tail, shapeless=True)


class _Prologue:
    """The prepared launches of one layer for one input shape and dtype; `embedded`: the
    second is mla_q_prep_embed (embed_q and SDPA's scale in it), else mla_q_prep_nope."""

    __slots__ = ("front", "names", "embedded", "tail")

    def __init__(self, qkv: Prepared, q_prep: QPrep, embedded: bool, tail=None):
        self.front, self.embedded, self.tail = Front(qkv, q_prep, COMPILED), embedded, tail
        self.names = (  # each launch's name and why its reference runs ("" for the kernel)
            (norm_qkv_a.name, qkv.reason),
            ((mla_q_prep_embed if embedded else mla_q_prep_nope).name, q_prep.call.reason),
        )

    def __call__(self, attn, x, mask, cache):
        """mlx-lm's Glm4MoeLiteAttention / DeepseekV3Attention at one token from its q_nope (or
        embed_q's output times SDPA's scale), q_pe * scale, kv_latent and k_pe on: the same ops
        on the same values."""
        q, q_pe, kv_latent, k_pe, _ = self.front(x, cache)
        kv_latent, k_pe = cache.update_and_fetch(kv_latent, k_pe)
        if self.tail is not None and mask is None:
            return attn["o_proj"](self.tail(q, q_pe, kv_latent, k_pe))
        pe_scores = q_pe @ k_pe.swapaxes(-1, -2)  # q_pe is already (q_pe * scale), as stock rounds it
        if mask is not None:
            pe_scores = mx.where(mask, pe_scores, mx.array(mx.finfo(pe_scores.dtype).min, pe_scores.dtype))
        if self.embedded:
            output = _attention_after_scale(q, kv_latent, pe_scores)
        else:
            output = scaled_dot_product_attention(
                attn["embed_q"](q), kv_latent, kv_latent, cache=cache, scale=attn.scale, mask=pe_scores
            )
        output = attn["unembed_out"](output)
        output = output.transpose(0, 2, 1, 3).reshape(x.shape[0], 1, -1)
        return attn["o_proj"](output)


def _build(layer, x, backend) -> _Prologue | str:
    """The two launches prepared for x (with embed_q in the second where its launch takes it
    and stock's attention runs its fallback), or why such steps run mlx-lm's code."""
    if backend in FALLBACK_BACKENDS:
        try:
            qkv, q_prep = mla_layer.prologue(layer, x, backend, norm_qkv_a, mla_q_prep_embed, embed=True)
            attn = layer.self_attn
            tail = _compiled_tail(attn.unembed_out) if COMPILE_TAIL else None
            return _Prologue(qkv, q_prep, embedded=True, tail=tail)
        except Stock:
            pass  # its launch skips these shapes: embed_q stays mlx-lm's
    try:
        qkv, q_prep = mla_layer.prologue(layer, x, backend, norm_qkv_a, mla_q_prep_nope, embed=False)
    except Stock as why:
        return str(why)
    return _Prologue(qkv, q_prep, embedded=False)


# The two launches of each prepared block through mx.compile (moe_block.COMPILED's reason);
# on since the preset ran bitwise with it on the H200 and the host A/B was faster
# (tests/patch/test_moe_block_compiled.py; profile_host.py --ab moe_compiled switches it too),
# 2026-12-02.
COMPILED = True

# id(layer) -> (a weak reference to it, {step key: (weights, block or why not)})
_BLOCKS = layer_registry()


def decode_plan(layer) -> dict[tuple, str]:
    """What the decode steps this layer has run with mla_prologue do, per step key (shape,
    dtype, backend): "kernel: a, b", "reference: a, b (why)", or "mlx-lm (why)"."""
    return mla_layer.decode_plan(_BLOCKS, layer)


def attention_half(layer, x, mask, cache):
    """The attention half of a decode step: r (before the residual add)."""
    return mla_layer.attention_half(_BLOCKS, layer, x, mask, cache, _weights, _build)


PATTERN = Pattern(
    name="mla_prologue",
    summary=(
        "decoder layer's attention half at decode: input RMSNorm + q_a and kv_a projections;"
        " q_a norm + q_b projection + RoPE of q_pe and its scale with kv norm + RoPE of k_pe;"
        " then mlx-lm's cache update, embed_q, attention, unembed_out and o_proj"
    ),
    fidelity="close",
    kernels=(norm_qkv_a, mla_q_prep_nope, mla_q_prep_embed),
    check=check,
    make=make,
    paths=("decode",),
    # mla_block fuses this and more; mla_attention's kernels would be bypassed at decode
    yields_to=("mla_block", "mla_attention"),
    part=(("attention", attention_half),),
)
