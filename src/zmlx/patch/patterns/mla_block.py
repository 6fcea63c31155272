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
                 gathered at the device position, the cache's slice_update, and mla_decode_len
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
bitwise stock on CUDA. residual_norm yields to it (its model loop goes around the layers).
"""

from __future__ import annotations

import operator
import weakref
from functools import partial
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from zmlx import backend as _backend
from zmlx.distributed import row_sharded_reason
from zmlx.kernels.core import KernelDef, Launch, Skip
from zmlx.kernels.glm47_rope import rope_table
from zmlx.kernels.mla_attention import mla_decode, mla_unembed
from zmlx.kernels.mla_decode_len import mla_decode_len
from zmlx.kernels.mla_q_prep import mla_q_prep
from zmlx.kernels.norm_qkv_a import attention_args, attention_reason, norm_qkv_a
from zmlx.kernels.prepared import Prepared, prepare
from zmlx.kernels.quant import weights_of
from zmlx.patch.attention import mla_reason, rope_args
from zmlx.patch.layer import blocks_of, make, stock_attention
from zmlx.patch.pattern import Pattern
from zmlx.static_cache import StaticMLACache


def check(layer, params) -> str | None:
    for attr in ("self_attn", "input_layernorm"):
        if not hasattr(layer, attr):
            return f"decoder layer has no {attr}"
    if type(layer.input_layernorm) is not nn.RMSNorm:
        return f"input_layernorm is a {type(layer.input_layernorm).__name__}"
    attn = layer.self_attn
    if (why := mla_reason(attn)) is not None:  # mla_q_prep ropes as glm47_rope: YaRN too
        return why
    if getattr(attn, "q_lora_rank", None) is None:
        return "q_lora_rank None (q_proj without q_a_layernorm): mla_q_prep does not fuse it"
    # tensor parallel: q_b_proj is all-to-sharded (this process's heads' rows), num_heads per process
    if (why := attention_reason(attn) or row_sharded_reason("q_b_proj", attn.q_b_proj)) is not None:
        return why
    if attn.q_a_layernorm.eps != attn.kv_a_layernorm.eps:
        return "q_a_layernorm and kv_a_layernorm have different eps (mla_q_prep takes one)"
    return None


# ---------------------------------------------------------------- the prepared block


def _weights(layer) -> tuple:
    """Every array the block's launches read, in a fixed order: a prepared block holds for
    these objects only (a model whose weights were replaced since is prepared again)."""
    attn = layer["self_attn"]
    out = [
        layer["input_layernorm"]["weight"],
        attn["q_a_layernorm"]["weight"],
        attn["kv_a_layernorm"]["weight"],
    ]
    for name in ("q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "embed_q", "unembed_out"):
        p = attn[name]
        out += (p["weight"], p.get("scales"), p.get("biases"))
    return tuple(out)


class _QPrep:
    """mla_q_prep for every position: its launch reads the position only through the rope
    table row it passes as input `cs` (a view), so the kernel prepared at position 0 is
    called with each step's row; the reference takes the position itself."""

    __slots__ = ("call", "table")

    def __init__(self, call: Prepared, table: Callable[[int], mx.array]):
        # Any: a ReferenceCall takes the position (an int) where the KernelCall takes the row
        self.call: Any = call
        self.table = table  # rows -> the layer's rope table (rope_table) of at least that many rows

    def __call__(self, q_a, ckv, offset: int):
        if self.call.path == "kernel":
            return self.call(q_a, ckv, self.table(offset + 1)[offset : offset + 1])
        return self.call(q_a, ckv, offset)

    def at(self, q_a, ckv, position: mx.array, rows: int):
        """The same at a device position (an int32 scalar) below `rows`: the kernel takes the
        table's row gathered in the graph, the reference gives mx.fast.rope the array."""
        if self.call.path == "kernel":
            return self.call(q_a, ckv, mx.take(self.table(rows), position.reshape(1), axis=0))
        return self.call(q_a, ckv, position)


def _launch(kernel: KernelDef) -> Callable[..., Launch | Skip]:
    if kernel.launch is None:
        raise ValueError(f"{kernel.name} has no launch")
    return kernel.launch


class _Attention:
    """The prepared launches of one layer for one input shape and dtype."""

    __slots__ = ("qkv", "q_prep", "scale", "unembed", "unembed_args", "unembed_kw", "backend", "names")

    def __init__(
        self,
        qkv: Prepared,
        q_prep: _QPrep,
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

    def __call__(self, attn, x, cache):
        q_a, ckv = self.qkv(x)
        offset = cache.offset
        if isinstance(offset, mx.array):  # a static cache in a compiled step: a device position
            qv, q_pe, kv_latent, k_pe = self.q_prep.at(q_a, ckv, offset, cache.capacity)
            lat, kpe = cache.update_and_fetch(kv_latent, k_pe)  # the whole buffers, written at offset
            n_valid = (offset + 1).astype(mx.int32).reshape(1)  # made in the graph, not on the host
            o, m, lsum = mla_decode_len(qv, q_pe, lat, kpe, n_valid, scale=self.scale)
        else:
            qv, q_pe, kv_latent, k_pe = self.q_prep(q_a, ckv, offset)
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


class _Stock(Exception):
    """Steps of these shapes run mlx-lm's attention; the message says why."""


def _ready(p: Prepared) -> Prepared:
    if p.skip:
        raise _Stock(p.skip)
    return p


def _build(layer, x, backend) -> _Attention | str:
    """The block's launches prepared for x (each one's outputs give the next its shapes; the
    attention is checked against a one-position cache), or why such steps run mlx-lm's code."""
    attn = layer.self_attn
    try:
        args, kw = attention_args(layer.input_layernorm, attn)
        qkv = _ready(prepare(norm_qkv_a, (x, *args), kw, (0,), backend))
        q_a, ckv = qkv(x)
        # heads, rope_dims, scale and the rope's (base, rope_scale; YaRN's freqs and mscale), as glm47_rope's
        (table, _), rope_kw = rope_args(attn, 0)
        (qb, qb_kw), (eq, eq_kw) = weights_of(attn.q_b_proj), weights_of(attn.embed_q)
        q_kw = dict(
            eps=attn.q_a_layernorm.eps,
            **rope_kw,
            **qb_kw,
            embed_group_size=eq_kw["group_size"],
            embed_bits=eq_kw["bits"],
        )
        q_norms = (attn.q_a_layernorm["weight"], *qb, attn.kv_a_layernorm["weight"], *eq)
        q_args = (q_a, ckv, *q_norms, table, 0)
        # live: q_a, ckv and the position, which the kernel reads as the table's row `cs`
        q_call = prepare(mla_q_prep, q_args, q_kw, (0, 1, 11), backend, derived={11: "cs"})
        rope = (rope_kw["rope_dims"], rope_kw["base"], rope_kw["rope_scale"])
        q_prep = _QPrep(_ready(q_call), partial(rope_table, *rope, freqs=rope_kw.get("freqs")))
        qv, q_pe, kv_latent, k_pe = q_prep(q_a, ckv, 0)
        spec = _launch(mla_decode)(backend, qv, q_pe, kv_latent, k_pe, scale=attn.scale)
        if isinstance(spec, Skip):
            raise _Stock(spec.reason)
        unembed_w, unembed_packing = weights_of(attn.unembed_out)
        unembed_kw = dict(dtype=x.dtype, **unembed_packing)
        o, m, lsum = (mx.zeros(s, d) for s, d in zip(spec.output_shapes, spec.output_dtypes))
        unembed = _ready(prepare(mla_unembed, (o, m, lsum, *unembed_w), unembed_kw, (0, 1, 2), backend))
    except _Stock as why:
        return str(why)
    return _Attention(qkv, q_prep, attn.scale, unembed, o.shape, unembed_w, unembed_kw, backend)


# id(layer) -> (a weak reference to it, {step key: (weights, block or why not)})
_BLOCKS: dict[int, tuple[weakref.ref, dict]] = {}


def _block(layer, x):
    """The layer's prepared block for this step's shape and dtype (prepared on first use,
    and again when the layer's weights are no longer the arrays it read), or why not."""
    backend = _backend.current()
    blocks = blocks_of(_BLOCKS, layer)
    key = (x.shape, x.dtype, backend)
    weights = _weights(layer)
    entry = blocks.get(key)
    if entry is not None and all(map(operator.is_, weights, entry[0])):
        return entry[1]
    if entry is not None:  # new weights: every shape is prepared again
        blocks.clear()
    block = _build(layer, x, backend)
    blocks[key] = (weights, block)
    return block


def decode_plan(layer) -> dict[tuple, str]:
    """What the decode steps this layer has run with mla_block do, per step key (shape,
    dtype, backend): "kernel: a, b, ...", "reference: a, b, ... (why)", or "mlx-lm (why)"."""
    entry = _BLOCKS.get(id(layer))
    out = {}
    for key, (_, block) in (entry[1] if entry is not None and entry[0]() is layer else {}).items():
        if isinstance(block, str):
            out[key] = f"mlx-lm ({block})"
            continue
        names = ", ".join(name for name, _ in block.names)
        reasons = sorted({why for _, why in block.names if why})
        out[key] = f"reference: {names} ({'; '.join(reasons)})" if reasons else f"kernel: {names}"
    return out


def _regime(mask, cache) -> bool:
    """Whether the launches take this step: mlx-lm's KVCache, or a StaticMLACache, with no
    mask; or a StaticMLACache in a compiled step (compiled_decode), whose mask is the cache's
    own mask of valid positions (the model makes it with make_mask), which the device length
    mla_decode_len takes stands for."""
    if type(cache) is KVCache:
        return mask is None
    if type(cache) is StaticMLACache:
        return mask is None or isinstance(cache.offset, mx.array)
    return False


def attention_half(layer, x, mask, cache):
    """The attention half of a decode step: r (before the residual add)."""
    if not _regime(mask, cache):  # mlx-lm's attention (as patched)
        return stock_attention(layer, x, mask, cache)
    block = _block(layer, x)
    if isinstance(block, str):  # outside the launches' regime
        return stock_attention(layer, x, mask, cache)
    return block(layer["self_attn"], x, cache)


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
