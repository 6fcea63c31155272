"""What the MLA attention-half patterns (mla_block, mla_prologue) share: which decoder layers
they take, the regime of their decode steps, the prepared first two launches (norm_qkv_a,
then mla_q_prep or its variant mla_q_prep_nope), and the per-layer store of prepared blocks
with its report (`decode_plan`).

Each pattern passes its own kernels and builder in at call time (its module's names), so
its tests can swap a kernel or the builder on the pattern's module."""

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
from zmlx.kernels.core import KernelDef
from zmlx.kernels.glm47_rope import rope_table
from zmlx.kernels.norm_qkv_a import attention_args, attention_reason
from zmlx.kernels.prepared import Prepared, prepare
from zmlx.kernels.quant import weights_of
from zmlx.patch.attention import rope_args
from zmlx.patch.layer import blocks_of, stock_attention
from zmlx.static_cache import StaticMLACache


def layer_reason(layer, attention_reason_of: Callable[[Any], str | None]) -> str | None:
    """None when the layer's input norm and MLA attention go through norm_qkv_a and
    mla_q_prep (`attention_reason_of`: the pattern's own test of the attention, e.g.
    mla_reason), else why not."""
    for attr in ("self_attn", "input_layernorm"):
        if not hasattr(layer, attr):
            return f"decoder layer has no {attr}"
    if type(layer.input_layernorm) is not nn.RMSNorm:
        return f"input_layernorm is a {type(layer.input_layernorm).__name__}"
    attn = layer.self_attn
    if (why := attention_reason_of(attn)) is not None:  # mla_q_prep ropes as glm47_rope: YaRN too
        return why
    if getattr(attn, "q_lora_rank", None) is None:
        return "q_lora_rank None (q_proj without q_a_layernorm): mla_q_prep does not fuse it"
    # tensor parallel: q_b_proj is all-to-sharded (this process's heads' rows), num_heads per process
    if (why := attention_reason(attn) or row_sharded_reason("q_b_proj", attn.q_b_proj)) is not None:
        return why
    if attn.q_a_layernorm.eps != attn.kv_a_layernorm.eps:
        return "q_a_layernorm and kv_a_layernorm have different eps (mla_q_prep takes one)"
    return None


def weights(layer, projections: tuple[str, ...]) -> tuple:
    """The norms' weights and these attention projections (each module and its arrays), in a
    fixed order: a prepared block holds for these objects only (a model whose weights or
    projection modules were replaced since, e.g. wrapped for LoRA, is prepared again)."""
    attn = layer["self_attn"]
    out = [
        layer["input_layernorm"]["weight"],
        attn["q_a_layernorm"]["weight"],
        attn["kv_a_layernorm"]["weight"],
    ]
    for name in projections:
        p = attn[name]
        out += (p, p.get("weight"), p.get("scales"), p.get("biases"), p.get("bias"))
    return tuple(out)


def regime(mask, cache) -> bool:
    """Whether the launches take this step: mlx-lm's KVCache, or a StaticMLACache, with no
    mask; or a StaticMLACache in a compiled step (compiled_decode), whose mask is the cache's
    own mask of valid positions (the model makes it with make_mask)."""
    if type(cache) is KVCache:
        return mask is None
    if type(cache) is StaticMLACache:
        return mask is None or isinstance(cache.offset, mx.array)
    return False


class QPrep:
    """mla_q_prep (or mla_q_prep_nope) for every position: its launch reads the position only
    through the rope table row it passes as input `cs` (a view), so the kernel prepared at
    position 0 is called with each step's row; the reference takes the position itself."""

    __slots__ = ("call", "table")

    def __init__(self, call: Prepared, table: Callable[[int], mx.array]):
        # Any: a ReferenceCall takes the position (an int) where the KernelCall takes the row
        self.call: Any = call
        self.table = table  # rows -> the layer's rope table (rope_table) of at least that many rows

    def __call__(self, q_a, ckv, offset: int):
        if self.call.path == "kernel":
            return self.call(q_a, ckv, self.table(offset + 1)[offset : offset + 1])
        return self.call(q_a, ckv, offset)

    def where(self, cache, as_array: bool = False):
        """The call's position argument for this step's cache position (an int, or a compiled
        step's device position below the static cache's capacity): the kernel's table row
        (sliced, or gathered in the graph), or the reference's position (`as_array`: an int
        becomes an int32 scalar, what a compiled caller hands on)."""
        offset = cache.offset
        if self.call.path == "kernel":
            if isinstance(offset, mx.array):
                return mx.take(self.table(cache.capacity), offset.reshape(1), axis=0)
            return self.table(offset + 1)[offset : offset + 1]
        return mx.array(offset, dtype=mx.int32) if as_array and isinstance(offset, int) else offset

    def step(self, q_a, ckv, cache):
        """Its outputs for this step's cache position."""
        return self.call(q_a, ckv, self.where(cache))


class Front:
    """A prologue's two launches at decode (norm_qkv_a, then the q-prep launch) from x at the
    cache's position: -> (*the q-prep's outputs, the first launch's second output). With
    `compiled`, through mx.compile (fixed shapes: x and the position's argument as an array),
    traced once, so MLX replays the launches instead of building each custom call again."""

    __slots__ = ("qkv", "q_prep", "_fn")

    def __init__(self, qkv: Prepared, q_prep: QPrep, compiled: bool):
        self.qkv, self.q_prep = qkv, q_prep
        self._fn = mx.compile(self._launches) if compiled else None

    def _launches(self, x, where):
        q_a, kv = self.qkv(x)
        return (*self.q_prep.call(q_a, kv, where), kv)

    @property
    def compiled(self) -> bool:
        return self._fn is not None

    def __call__(self, x, cache):
        if self._fn is None:
            return self._launches(x, self.q_prep.where(cache))
        return self._fn(x, self.q_prep.where(cache, as_array=True))


class Stock(Exception):
    """Steps of these shapes run mlx-lm's attention; the message says why."""


def ready(p: Prepared) -> Prepared:
    if p.skip:
        raise Stock(p.skip)
    return p


def prologue(layer, x, backend, qkv_kernel: KernelDef, q_kernel: KernelDef, embed: bool) -> tuple:
    """(norm_qkv_a, QPrep) prepared for x: `q_kernel` is mla_q_prep (embed: with embed_q's
    weights) or mla_q_prep_nope; Stock when either launch skips these shapes."""
    attn = layer.self_attn
    args, kw = attention_args(layer.input_layernorm, attn)
    qkv = ready(prepare(qkv_kernel, (x, *args), kw, (0,), backend))
    q_a, ckv = qkv(x)
    # heads, rope_dims, scale and the rope's (base, rope_scale; YaRN's freqs and mscale), as glm47_rope's
    (table, _), rope_kw = rope_args(attn, 0)
    qb, qb_kw = weights_of(attn.q_b_proj)
    q_kw = dict(eps=attn.q_a_layernorm.eps, **rope_kw, **qb_kw)
    q_args: tuple = (q_a, ckv, attn.q_a_layernorm["weight"], *qb, attn.kv_a_layernorm["weight"])
    if embed:
        eq, eq_kw = weights_of(attn.embed_q)
        q_kw.update(embed_group_size=eq_kw["group_size"], embed_bits=eq_kw["bits"])
        q_args += tuple(eq)
    q_args += (table, 0)
    pos = len(q_args) - 1
    # live: q_a, ckv and the position, which the kernel reads as the table's row `cs`
    q_call = ready(prepare(q_kernel, q_args, q_kw, (0, 1, pos), backend, derived={pos: "cs"}))
    rope = (rope_kw["rope_dims"], rope_kw["base"], rope_kw["rope_scale"])
    return qkv, QPrep(q_call, partial(rope_table, *rope, freqs=rope_kw.get("freqs")))


def block(registry: dict, layer, x, layer_weights: tuple, build: Callable) -> Any:
    """The layer's prepared block for this step's shape and dtype, from `registry` (prepared
    by build(layer, x, backend) on first use, and again when the layer's weights are no
    longer the arrays it read), or why not (a str)."""
    backend = _backend.current()
    blocks = blocks_of(registry, layer)
    key = (x.shape, x.dtype, backend)
    entry = blocks.get(key)
    if entry is not None and all(map(operator.is_, layer_weights, entry[0])):
        return entry[1]
    if entry is not None:  # new weights: every shape is prepared again
        blocks.clear()
    made = build(layer, x, backend)
    blocks[key] = (layer_weights, made)
    return made


def attention_half(
    registry: dict,
    layer,
    x,
    mask,
    cache,
    layer_weights: Callable[[Any], tuple],
    build: Callable,
    in_regime: Callable[[Any, Any], bool] = regime,
) -> mx.array:
    """The attention half of a decode step (r, before the residual add): in the launches'
    regime (`in_regime(mask, cache)`: MLA's `regime` unless the pattern has its own) the
    layer's prepared block from `registry` (`block`), called as made(self_attn, x, mask,
    cache); else, or where the block says why not, mlx-lm's attention (as the attention
    patterns patched it)."""
    if not in_regime(mask, cache):
        return stock_attention(layer, x, mask, cache)
    made = block(registry, layer, x, layer_weights(layer), build)
    if isinstance(made, str):  # outside the launches' regime
        return stock_attention(layer, x, mask, cache)
    return made(layer["self_attn"], x, mask, cache)


def decode_plan(registry: dict[int, tuple[weakref.ref, dict]], layer) -> dict[tuple, str]:
    """What the decode steps this layer has run with a pattern did, per step key (shape, dtype,
    backend): "kernel: a, b, ...", "reference: a, b, ... (why)", or "mlx-lm (why)". A block
    names its launches as `names`: (name, why its reference runs, "" for the kernel)."""
    entry = registry.get(id(layer))
    out = {}
    for key, (_, made) in (entry[1] if entry is not None and entry[0]() is layer else {}).items():
        if isinstance(made, str):
            out[key] = f"mlx-lm ({made})"
            continue
        names = ", ".join(name for name, _ in made.names)
        reasons = sorted({why for _, why in made.names if why})
        out[key] = f"reference: {names} ({'; '.join(reasons)})" if reasons else f"kernel: {names}"
    return out
