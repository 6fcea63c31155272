"""compiled_decode: each decode step as one mx.compile'd graph over a static cache.

Patches the model (`Model` of glm4_moe_lite and the DeepSeek-V3 builds, with their MLA latent
cache; of glm4_moe, qwen3_moe and mixtral, with their GQA keys and values: any model whose
layers' caches are mlx-lm's KVCache) with two methods:

- `make_cache()` returns one `zmlx.static_cache.StaticMLACache` per layer (mlx-lm's
  make_prompt_cache, generate, stream_generate and the server call it), so the cache's
  buffers change shape only at capacity buckets (powers of two);
- `__call__` runs a decode step (one token per sequence, every layer's cache static and
  non-empty) through a compiled function of the whole model whose inputs are the tokens,
  the device write position and every layer's two buffers, and whose outputs are the logits,
  the next position and the written buffers. mx.compile traces it once per (capacity
  bucket, batch size, dtype) and replays it after: the host builds no graph per token.

Everything else runs mlx-lm's code eagerly, into the same cache: prompts, calls without a
cache or with other caches (batch generation merges the static caches into mlx-lm's
BatchKVCache, so it runs stock), and models that run pipeline-parallel (skipped at patch
time). `stats(model)` says how many steps were compiled, how many traces were made, and why
decode-shaped calls ran stock. Other patterns run inside the traced graph as they run
eagerly (the block kernels become nodes of the compiled graph).

The compiled graph holds the model's weights as constants: a model whose weights or patterns
change gets a new compiled function at its next `make_cache()` (or patch()).
"""

from __future__ import annotations

import weakref
from collections import Counter
from contextlib import contextmanager
from functools import cache
from typing import Any, Iterator

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache

from zmlx.patch.pattern import Pattern
from zmlx.static_cache import StaticMLACache

# zmlx.patch.core keeps a patched model's PatchResult under this name; a compiled function
# belongs to one patch of one model (another patch may change what the graph computes).
_RESULT_ATTR = "zmlx_patch_result"


def check(model, params) -> str | None:
    layers = getattr(model, "layers", None)
    if not layers:
        return "model has no layers"
    inner = getattr(model, "model", None)
    if getattr(inner, "pipeline_size", 1) > 1:
        return "pipeline-parallel model (its layers' caches live in several processes)"
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            return f"layer {i} has no self_attn (the static cache stands in for its attention's cache)"
        if hasattr(attn, "indexer"):
            return f"layer {i} has a DSA indexer (its own key cache; the static cache holds the latent one)"
    # The static cache stands in for KVCache (MLA's latent pair or GQA's keys and values, the
    # same protocol); a model that makes other caches (sliding windows, lists) keeps them.
    for i, c in enumerate(model.make_cache() if hasattr(model, "make_cache") else ()):
        if type(c) is not KVCache:
            kind = type(c).__name__
            return f"layer {i}'s cache is {kind}, not KVCache (the static cache stands in for KVCache)"
    return None


class _Step:
    """The compiled decode step of one patched model, and its counters."""

    def __init__(self, result: Any, weights: tuple[int, ...]):
        self.result, self.weights = result, weights
        self.traces = 0
        self.compiled_steps = 0
        self.stock_steps: Counter[str] = Counter()
        self._live: tuple[Any, list] | None = None  # (model, caches) of the call being run
        self._compiled = mx.compile(self._trace)
        self._fn = self._compiled

    def _trace(self, inputs, position, *buffers):
        """Run once per new (bucket, batch, dtype) signature, by mx.compile, with tracers."""
        self.traces += 1
        assert self._live is not None
        model, caches = self._live
        n = len(caches)
        saved = [(c.keys, c.values) for c in caches]
        for c, k, v in zip(caches, buffers[:n], buffers[n:]):
            c.trace_at(k, v, position)
        try:
            logits = type(model).__zmlx_original__.__call__(model, inputs, caches)
            written = [c.keys for c in caches] + [c.values for c in caches]
        finally:
            for c, (k, v) in zip(caches, saved):
                c.keys, c.values = k, v
                c.end_trace()
        return (logits, position + inputs.shape[1], *written)

    def __call__(self, model, inputs, caches: list):
        # One token dtype for every step: mlx-lm's generate passes the prompt's last token as
        # int32 and sampled ones as uint32 (argmax, categorical), and mx.compile traces per dtype.
        if inputs.dtype != mx.uint32:
            inputs = inputs.astype(mx.uint32)
        n_new = inputs.shape[1]
        for c in caches:
            c.reserve(n_new)
        buffers = [c.keys for c in caches] + [c.values for c in caches]
        self._live = (model, caches)
        try:
            logits, position, *written = self._fn(inputs, caches[0].position, *buffers)
        finally:
            self._live = None
        n = len(caches)
        for c, k, v in zip(caches, written[:n], written[n:]):
            c.keys, c.values = k, v
            c.advance(n_new, position)
        self.compiled_steps += 1
        return logits


# id(model) -> its step; an entry goes with its model (weakref.finalize)
_STEPS: dict[int, _Step] = {}


def _weights(model) -> tuple[int, ...]:
    return tuple(id(item[1]) for item in tree_flatten(model.parameters()))


def _step_for(model, check_weights: bool) -> _Step:
    """The model's compiled step, made anew when the model was patched again since, or (when
    `check_weights`) its weights were replaced."""
    key = id(model)
    step = _STEPS.get(key)
    result = getattr(model, _RESULT_ATTR, None)
    if step is not None and step.result is result and not (check_weights and step.weights != _weights(model)):
        return step
    if step is None:
        weakref.finalize(model, _STEPS.pop, key, None)
    step = _STEPS[key] = _Step(result, _weights(model))
    return step


def _stock_reason(model, inputs, cache) -> str | None:
    """Why this call runs mlx-lm's code eagerly (None: it runs the compiled step)."""
    if cache is None:
        return "no cache"
    if inputs.ndim != 2 or inputs.shape[1] != 1:
        return "not one token per sequence (a prompt)"
    if not all(type(c) is StaticMLACache for c in cache):
        return f"cache is not static ({type(cache[0]).__name__})"
    if len(cache) != len(model.layers):
        return "cache has not one entry per layer"
    if cache[0].empty():
        return "cache is empty (the first token runs eagerly and sizes the buffers)"
    return None


def stats(model) -> dict[str, Any]:
    """The compiled step's counters for `model` under the patch in force: traces made, steps
    compiled, and decode-shaped calls that ran stock, by reason (zero before the first call)."""
    step = _STEPS.get(id(model))
    if step is None or step.result is not getattr(model, _RESULT_ATTR, None):
        return {"traces": 0, "compiled_steps": 0, "stock_steps": {}}
    return {
        "traces": step.traces,
        "compiled_steps": step.compiled_steps,
        "stock_steps": dict(step.stock_steps),
    }


@contextmanager
def uncompiled(model) -> Iterator[None]:
    """Inside, `model`'s decode steps run the traced step's code eagerly, without mx.compile:
    the static cache's traced path (whole buffers, device position, mask) with MLX's eager
    kernels. A diagnostic: what differs between it and mlx-lm's eager step is the static
    path's, what differs between it and the compiled step is mx.compile's
    (benchmarks/gpu/diagnose_compiled.py). Each such step counts as a trace in `stats`."""
    step = _step_for(model, check_weights=False)
    step._fn = step._trace
    try:
        yield
    finally:
        step._fn = step._compiled


def _call(self, inputs, cache=None):
    reason = _stock_reason(self, inputs, cache)
    if reason is None:
        return _step_for(self, check_weights=False)(self, inputs, cache)
    if cache is not None and inputs.ndim == 2 and inputs.shape[1] == 1:
        _step_for(self, check_weights=False).stock_steps[reason] += 1
    return type(self).__zmlx_original__.__call__(self, inputs, cache)


def _call_embeddings(self, inputs, cache=None, input_embeddings=None):
    """`_call` for the models whose __call__ also takes input embeddings (Qwen3-MoE, Mixtral):
    a call with them runs mlx-lm's code (the compiled step takes tokens)."""
    if input_embeddings is not None:
        return type(self).__zmlx_original__.__call__(self, inputs, cache, input_embeddings)
    return _call(self, inputs, cache)


def _make_cache(self):
    _step_for(self, check_weights=True)
    return [StaticMLACache() for _ in self.layers]


@cache
def make(method: str = "__call__", input_embeddings: bool = False):
    """`input_embeddings` (family data): the model's __call__ has that third argument."""
    call = _call_embeddings if input_embeddings else _call
    return {"__call__": call, "make_cache": _make_cache}[method]


PATTERN = Pattern(
    name="compiled_decode",
    summary="static KV cache; each decode step one mx.compile'd graph of the whole model",
    # Bitwise stock on the CPU (tests/patch/test_compiled_decode.py); close elsewhere until
    # a GPU run shows identical tokens: compile fuses elementwise ops, and attention runs
    # over the whole masked bucket, which may change the GPU kernels' accumulation order.
    fidelity="close",
    exact_on=("cpu",),
    kernels=(),
    check=check,
    make=make,
    method="__call__",
    adds=("make_cache",),
    paths=("decode",),
)
