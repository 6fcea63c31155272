"""gqa_prologue: the grouped-query attention half of a decoder layer at decode (Qwen3-MoE's,
GLM-4.5's, gpt-oss's) with its first stock launches fused into two, every value stock's
(close; exact on CUDA and the CPU).

Patches the decoder layer (`Qwen3MoeDecoderLayer`, glm4_moe's `DecoderLayer`, gpt-oss's
`TransformerBlock`) as the attention half of zmlx.patch.layer's shared `__call__`, like
mla_prologue (moe_block supplies the MoE half; on a layer both patch, the two halves run
together). A decode step with mlx-lm's `KVCache` (or gpt-oss's sliding-window
`RotatingKVCache`) and no mask, or compiled_decode's traced step over zmlx's StaticMLACache
(the rope row gathered at the device position, the cache's mask of valid positions given
to the attention), runs

    norm_qkv_a     input_layernorm + q_proj + [k_proj | v_proj], one pass over the row (the
                   k and v projections' packed rows side by side, one matrix made at patch
                   time: each row's dot is the same whichever matrix holds it)
    qk_norm_rope   the q and k projections' biases (GLM-4.5's, gpt-oss's), q_norm and k_norm
                   per head (when the attention has them) + the rope of both at the cache
                   position (whole-head, GLM-4.5's partial, or gpt-oss's YaRN)

and then mlx-lm's own ops in mlx-lm's order: v_proj's bias add, the values' reshape, the
cache update, scaled_dot_product_attention (with gpt-oss's sinks), the heads' merge and
o_proj (the residual add is the MoE half's). Stock runs eight to eleven launches there
(input_layernorm, three matvecs, the biases' adds, two norms, two ropes).
Both launches are bitwise stock on CUDA (MLX's rms_norm, qmv/gemv and rope orders, one
sequence; more take mlx-lm's attention) and run their references, stock's op sequence, on
the CPU; on Metal their dots are float32 sums (close). Launches are prepared and reported
as mla_prologue's (zmlx.patch.mla_layer's store and report, which are not MLA's own).
Prompts, masked steps, other caches and layers whose launches skip (why: `decode_plan`) run
mlx-lm's attention.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.models.rope_utils import YarnRoPE

from zmlx.distributed import sharded_linear_reason
from zmlx.kernels.glm47_rope import rope_table
from zmlx.kernels.norm_qkv_a import norm_qkv_a
from zmlx.kernels.prepared import Prepared, prepare
from zmlx.kernels.qk_norm_rope import qk_norm_rope
from zmlx.kernels.quant import dense_or_quantized, weights_of
from zmlx.patch import mla_layer
from zmlx.patch.layer import make
from zmlx.patch.layer import registry as layer_registry
from zmlx.patch.mla_layer import Front, QPrep, Stock, ready
from zmlx.patch.pattern import Pattern

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
# the attention's head counts, as mlx-lm's GQA attentions name them
_HEADS = (
    ("n_heads", "n_kv_heads"),
    ("num_attention_heads", "num_key_value_heads"),
    ("num_heads", "num_key_value_heads"),  # Mixtral's
)


def heads_of(attn) -> tuple[int, int] | None:
    """(query heads, key heads) of an mlx-lm attention module, or None."""
    for h, hk in _HEADS:
        if isinstance(getattr(attn, h, None), int) and isinstance(getattr(attn, hk, None), int):
            return getattr(attn, h), getattr(attn, hk)
    return None


def _projections_reason(attn) -> str | None:
    for name in _PROJECTIONS:
        p = attn[name]
        why = sharded_linear_reason(name, p) or dense_or_quantized(
            name, p, nn.QuantizedLinear, nn.Linear, bias=True
        )
        if why is not None:
            return why
        if "bias" in p and not isinstance(p, nn.QuantizedLinear):  # stock's addmm is not followed
            return f"{name} is an unquantized linear with a bias"
    if len({"bias" in attn[name] for name in _PROJECTIONS}) > 1:
        return "some of q_proj, k_proj and v_proj have a bias, not all"
    if weights_of(attn.k_proj)[1] != weights_of(attn.v_proj)[1]:
        return "k_proj and v_proj are quantized differently (their rows cannot share one matrix)"
    return None


def _scale_attr(attn) -> str | None:
    """The attribute holding SDPA's scale (gpt-oss calls it sm_scale)."""
    return next((a for a in ("scale", "sm_scale") if isinstance(getattr(attn, a, None), float)), None)


def check(layer, params) -> str | None:
    mlp = params.get("mlp_name", "mlp")  # the family data's name of the MoE half's module
    for attr in ("self_attn", "input_layernorm", mlp, "post_attention_layernorm"):
        if not hasattr(layer, attr):  # the shared __call__ runs mlx-lm's standard layer
            return f"decoder layer has no {attr}"
    if type(layer.input_layernorm) is not nn.RMSNorm:
        return f"input_layernorm is a {type(layer.input_layernorm).__name__}"
    attn = layer.self_attn
    for attr in (*_PROJECTIONS, "o_proj", "rope"):
        if not hasattr(attn, attr):
            return f"attention has no {attr} (not a grouped-query attention)"
    if _scale_attr(attn) is None:
        return "attention has no scale (scale or sm_scale)"
    if (heads := heads_of(attn)) is None:
        return "attention names no head counts (n_heads / n_kv_heads)"
    norms = [type(attn[n]) if n in attn else None for n in ("q_norm", "k_norm")]
    if norms not in ([nn.RMSNorm, nn.RMSNorm], [None, None]):
        return f"q_norm and k_norm are {[getattr(t, '__name__', None) for t in norms]} (two RMSNorms or none)"
    rope, head_dim = attn.rope, attn.q_proj.weight.shape[0] // heads[0]
    if (
        type(rope) not in (nn.RoPE, YarnRoPE)
        or rope.traditional
        or rope.dims % 2
        or not 0 < rope.dims <= head_dim
    ):
        kind = type(rope).__name__
        return f"rope is a {kind} (only nn.RoPE or YarnRoPE, traditional False, over at most the head)"
    return _projections_reason(attn)


def _weights(layer) -> tuple:
    """Every array the two launches read, and the modules holding them, in a fixed order: a
    prepared block holds for these objects only (replaced weights are prepared again)."""
    attn = layer["self_attn"]
    norms = [attn[n]["weight"] if n in attn else None for n in ("q_norm", "k_norm")]
    out = [layer["input_layernorm"]["weight"], *norms]
    for name in _PROJECTIONS:
        p = attn[name]
        out += (p, p.get("weight"), p.get("scales"), p.get("biases"), p.get("bias"))
    out.append(attn.rope)  # its kind and frequencies made the table
    return tuple(out)


class _Prologue:
    """The prepared launches of one layer for one input shape and dtype."""

    __slots__ = ("front", "names", "keys", "kv_heads", "v_bias", "scale")

    def __init__(self, qkv: Prepared, q_prep: QPrep, keys: int, kv_heads: int, v_bias, scale: str):
        self.front, self.keys = Front(qkv, q_prep, COMPILED), keys  # keys: the k rows before v's
        self.kv_heads, self.v_bias, self.scale = kv_heads, v_bias, scale  # scale: its attribute
        self.names = ((norm_qkv_a.name, qkv.reason), (qk_norm_rope.name, q_prep.call.reason))

    def __call__(self, attn, x, mask, cache):
        """mlx-lm's attention (qwen3_moe's, glm4_moe's, gpt-oss's) at one token from its
        normed, roped queries and keys and its values on: the same ops on the same values."""
        b = x.shape[0]
        queries, keys, kv = self.front(x, cache)
        values = kv[..., self.keys :]
        if self.v_bias is not None:  # v_proj's `x + bias`
            values = values + self.v_bias
        values = values.reshape(b, 1, self.kv_heads, -1).transpose(0, 2, 1, 3)
        keys, values = cache.update_and_fetch(keys, values)
        scale = getattr(attn, self.scale)
        if "sinks" in attn:  # gpt-oss's
            output = scaled_dot_product_attention(
                queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=attn["sinks"]
            )
        else:
            output = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask)
        output = output.transpose(0, 2, 1, 3).reshape(b, 1, -1)
        return attn["o_proj"](output)


def _build(layer, x, backend) -> _Prologue | str:
    """The two launches prepared for x, or why such steps run mlx-lm's code."""
    attn = layer.self_attn
    heads, kv_heads = heads_of(attn)  # type: ignore[misc]  # the check found them
    (qw, qkw), (kw_, kkw), (vw, _) = (weights_of(attn[n]) for n in _PROJECTIONS)
    # k's rows then v's, one matrix (each packed row's dot is independent of the others)
    kvw = tuple(None if k is None else mx.concatenate([k, v]) for k, v in zip(kw_, vw))
    mx.eval([a for a in kvw if a is not None])
    norm = layer.input_layernorm
    kw = dict(eps=norm.eps, **qkw, kv_group_size=kkw["group_size"], kv_bits=kkw["bits"])
    try:
        qkv = ready(prepare(norm_qkv_a, (x, norm["weight"], *qw, *kvw), kw, (0,), backend))
        q_a, kv = qkv(x)
        rope = attn.rope
        head_dim = q_a.shape[-1] // heads
        if type(rope) is YarnRoPE:  # called with its default scale 1.0; the table has its frequencies
            rope_kw = dict(base=None, rope_scale=1.0, freqs=rope._freqs, mscale=rope.mscale)
        else:
            rope_kw = dict(base=rope.base, rope_scale=rope.scale)
        table = partial(
            rope_table, rope.dims, rope_kw["base"], rope_kw["rope_scale"], freqs=rope_kw.get("freqs")
        )
        norms = "q_norm" in attn
        q_kw = dict(
            heads=heads,
            kv_heads=kv_heads,
            eps_q=attn.q_norm.eps if norms else None,
            eps_k=attn.k_norm.eps if norms else None,
            rope_dims=rope.dims,
            **rope_kw,
        )
        weights = (attn.q_norm["weight"], attn.k_norm["weight"]) if norms else (None, None)
        biases = tuple(attn[n].get("bias") for n in _PROJECTIONS)
        q_args = (q_a, kv, *weights, table(1), 0, *biases[:2])
        # live: q_a, kv and the position, which the kernel reads as the table's row `cs`
        q_call = ready(prepare(qk_norm_rope, q_args, q_kw, (0, 1, 5), backend, derived={5: "cs"}))
    except Stock as why:
        return str(why)
    scale = _scale_attr(attn)
    return _Prologue(qkv, QPrep(q_call, table), kv_heads * head_dim, kv_heads, biases[2], scale)  # type: ignore[arg-type]


# The two launches of each prepared block through mx.compile (moe_block.COMPILED's reason:
# MLX replays them instead of building each custom call's source every step); the same
# kernels. On since the presets ran bitwise with it on the H200 and the host A/B was faster
# (tests/patch/test_moe_block_compiled.py, profile_host.py --ab moe_compiled, which switch
# this and moe_block.COMPILED together), 2026-12-02.
COMPILED = True

# id(layer) -> (a weak reference to it, {step key: (weights, block or why not)})
_BLOCKS = layer_registry()


def decode_plan(layer) -> dict[tuple, str]:
    """What the decode steps this layer has run with gqa_prologue do, per step key (shape,
    dtype, backend): "kernel: a, b", "reference: a, b (why)", or "mlx-lm (why)"."""
    return mla_layer.decode_plan(_BLOCKS, layer)


def _regime(mask, cache) -> bool:
    """The launches take steps without a mask on mlx-lm's KVCache or RotatingKVCache
    (gpt-oss's sliding-window layers: at one token its mask is None while the window is the
    cache's size), and MLA's regime's StaticMLACache steps: compiled_decode's traced step,
    whose mask of the valid positions goes to the attention, its position to the rope row."""
    return mla_layer.regime(mask, cache) or (mask is None and type(cache) is RotatingKVCache)


def attention_half(layer, x, mask, cache):
    """The attention half of a decode step: r (before the residual add)."""
    return mla_layer.attention_half(_BLOCKS, layer, x, mask, cache, _weights, _build, _regime)


PATTERN = Pattern(
    name="gqa_prologue",
    summary=(
        "decoder layer's grouped-query attention half at decode (Qwen3-MoE, GLM-4.5, gpt-oss): input"
        " RMSNorm + q, k and v projections; their biases, q and k norms and RoPE; then mlx-lm's"
        " cache update, attention and o_proj"
    ),
    fidelity="close",
    kernels=(norm_qkv_a, qk_norm_rope),
    check=check,
    make=make,
    paths=("decode",),
    part=(("attention", attention_half),),
)
