"""mla_block: the attention half of a decoder layer at decode in four launches and o_proj (close).

Patches the decoder layer (on glm4_moe_lite: `Glm4MoeLiteDecoderLayer`) as the attention half
of zmlx.patch.layer's shared `__call__` (moe_block supplies the MoE half; each is chosen on
its own, and on a layer both patch the two halves run together). A decode step with mlx-lm's
plain `KVCache` and no mask runs

    norm_qkv_a   input_layernorm + q_a_proj + kv_a_proj_with_mqa, one pass over the row
    mla_q_prep   q_a_layernorm + q_b_proj + rope of q_pe and its scale + embed_q (float32);
                 kv_a_layernorm + rope of k_pe (nn.RoPE, or the DeepSeek-V3 family's YaRN
                 as glm47_rope takes it; another rope_scaling is skipped with its reason)
    cache.update_and_fetch(kv_latent, k_pe): mlx-lm's own cache (prompt caches, trimming
                 and cache files keep working)
    mla_decode   flash-decoding over the latent cache, its length read from the buffers' shapes
                 (inside compiled_decode's traced step, over zmlx's StaticMLACache: the rope row
                 gathered at the device position, the cache's write at it, and mla_decode_len
                 over the whole buffers, the length position + 1 a device input: no host array,
                 no retrace per token)
    mla_unembed  the chunks combined + unembed_out
    o_proj       mlx-lm's module

norm_qkv_a is prepared once per (layer, input shape, dtype, backend), and again for new
weights (zmlx.kernels.prepared). mla_q_prep reads the position only through the rope table
row it passes as an input (a view), so it is prepared once for every position and called
with each step's row. mla_decode's inputs grow with the context: a plain kernel call each
step, as in mla_attention. mla_unembed's shapes change with the chunk count only (at most
TARGET_CHUNKS), so it is prepared per count. Prompts, masked steps, other caches and layers
whose launches skip (why: `decode_plan`) run mlx-lm's attention: the layer's self_attn, with
the attention patterns that patched it. Close, not exact: the attention itself runs in
float32 (mla_attention's kernels); norm_qkv_a and mla_q_prep's q_pe, kv_latent and k_pe are
bitwise stock on CUDA. residual_norm yields to it (its model loop goes around the layers), and
so does mla_prologue (these first two launches, mla_q_prep without embed_q, then mlx-lm's ops).
Layer checks, regime, prepared first launches and the blocks' store: zmlx.patch.mla_layer.
"""

from __future__ import annotations

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Skip
from zmlx.kernels.mla_attention import mla_decode, mla_unembed
from zmlx.kernels.mla_decode_len import mla_decode_len
from zmlx.kernels.mla_q_prep import mla_q_prep
from zmlx.kernels.norm_qkv_a import norm_qkv_a
from zmlx.kernels.prepared import Prepared, prepare
from zmlx.kernels.quant import weights_of
from zmlx.patch import mla_layer
from zmlx.patch.attention import mla_reason
from zmlx.patch.layer import make
from zmlx.patch.layer import registry as layer_registry
from zmlx.patch.mla_layer import QPrep, Stock, ready
from zmlx.patch.pattern import Pattern


def check(layer, params) -> str | None:
    return mla_layer.layer_reason(layer, mla_reason)  # mla_reason: embed_q and unembed_out too


# ---------------------------------------------------------------- the prepared block


def _weights(layer) -> tuple:
    """Every array the block's launches read (mla_layer.weights)."""
    return mla_layer.weights(layer, ("q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "embed_q", "unembed_out"))


def _launch(kernel: KernelDef):
    if kernel.launch is None:
        raise ValueError(f"{kernel.name} has no launch")
    return kernel.launch


class _Attention:
    """The prepared launches of one layer for one input shape and dtype."""

    __slots__ = ("qkv", "q_prep", "scale", "unembed", "unembed_args", "unembed_kw", "backend", "names")

    def __init__(
        self,
        qkv: Prepared,
        q_prep: QPrep,
        scale: float,
        unembed: Prepared,
        o_shape,
        unembed_args,
        unembed_kw,
        backend,
    ):
        self.qkv, self.q_prep, self.scale, self.backend = qkv, q_prep, scale, backend
        self.unembed: dict[tuple, Prepared] = {o_shape: unembed}  # per chunk count
        self.unembed_args, self.unembed_kw = unembed_args, unembed_kw
        self.names = (  # each launch's name and why its reference runs ("" for the kernel)
            (norm_qkv_a.name, qkv.reason),
            (mla_q_prep.name, q_prep.call.reason),
            (mla_decode.name, mla_decode.plan(backend).reason),
            (mla_unembed.name, unembed.reason),
        )

    def __call__(self, attn, x, mask, cache):
        q_a, ckv = self.qkv(x)
        qv, q_pe, kv_latent, k_pe = self.q_prep.step(q_a, ckv, cache)
        offset = cache.offset
        if isinstance(offset, mx.array):  # a static cache in a compiled step: a device position
            lat, kpe = cache.update_and_fetch(kv_latent, k_pe)  # the whole buffers, written at offset
            n_valid = (offset + 1).astype(mx.int32).reshape(1)  # made in the graph, not on the host
            o, m, lsum = mla_decode_len(qv, q_pe, lat, kpe, n_valid, scale=self.scale)
        else:
            lat, kpe = cache.update_and_fetch(kv_latent, k_pe)  # views of the buffers, offset + 1 positions
            o, m, lsum = mla_decode(qv, q_pe, lat, kpe, scale=self.scale)
        unembed = self.unembed.get(o.shape)
        if unembed is None:  # a chunk count not seen yet (at most TARGET_CHUNKS of them)
            args = (o, m, lsum, *self.unembed_args)
            unembed = self.unembed[o.shape] = prepare(
                mla_unembed, args, self.unembed_kw, (0, 1, 2), self.backend
            )
        out = unembed(o, m, lsum)  # (B, H, 1, v_head_dim): one token, so (B, 1, H * v) as stock lays it out
        return attn["o_proj"](out.reshape(x.shape[0], 1, -1))


def _build(layer, x, backend) -> _Attention | str:
    """The block's launches prepared for x (each one's outputs give the next its shapes; the
    attention is checked against a one-position cache), or why such steps run mlx-lm's code."""
    attn = layer.self_attn
    try:
        qkv, q_prep = mla_layer.prologue(layer, x, backend, norm_qkv_a, mla_q_prep, embed=True)
        qv, q_pe, kv_latent, k_pe = q_prep(*qkv(x), 0)
        spec = _launch(mla_decode)(backend, qv, q_pe, kv_latent, k_pe, scale=attn.scale)
        if isinstance(spec, Skip):
            raise Stock(spec.reason)
        unembed_w, unembed_packing = weights_of(attn.unembed_out)
        unembed_kw = dict(dtype=x.dtype, **unembed_packing)
        o, m, lsum = (mx.zeros(s, d) for s, d in zip(spec.output_shapes, spec.output_dtypes))
        unembed = ready(prepare(mla_unembed, (o, m, lsum, *unembed_w), unembed_kw, (0, 1, 2), backend))
    except Stock as why:
        return str(why)
    return _Attention(qkv, q_prep, attn.scale, unembed, o.shape, unembed_w, unembed_kw, backend)


# id(layer) -> (a weak reference to it, {step key: (weights, block or why not)})
_BLOCKS = layer_registry()


def decode_plan(layer) -> dict[tuple, str]:
    """What the decode steps this layer has run with mla_block do, per step key (shape,
    dtype, backend): "kernel: a, b, ...", "reference: a, b, ... (why)", or "mlx-lm (why)"."""
    return mla_layer.decode_plan(_BLOCKS, layer)


def attention_half(layer, x, mask, cache):
    """The attention half of a decode step: r (before the residual add)."""
    return mla_layer.attention_half(_BLOCKS, layer, x, mask, cache, _weights, _build)


PATTERN = Pattern(
    name="mla_block",
    summary=(
        "decoder layer's attention half at decode: input RMSNorm + q_a and kv_a projections;"
        " q_a norm + q_b projection + RoPE + embed_q with kv norm + RoPE; mlx-lm's cache update;"
        " flash-decoding over the latent cache; combine + unembed_out; o_proj"
    ),
    fidelity="close",
    kernels=(norm_qkv_a, mla_q_prep, mla_decode, mla_decode_len, mla_unembed),
    check=check,
    make=make,
    paths=("decode",),
    part=(("attention", attention_half),),
)
