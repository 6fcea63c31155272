"""The decoder layer's `__call__` that the block patterns share: mla_block supplies its
attention half, moe_block its MoE half. mlx-lm's layer (glm4_moe_lite, deepseek_v3,
qwen3_moe, gpt_oss) is

    r = self_attn(input_layernorm(x), mask, cache); h = x + r
    return h + mlp(post_attention_layernorm(h))

and a decode step (one token per sequence) here is `moe(layer, x, attention(layer, x, mask,
cache))`, where a half no pattern supplies is that code, through the layer's own modules
(so the module patterns inside them still apply). Each block pattern names its half as its
`Pattern.part` and both have `make` as their make(): on a layer that both patch, the
registry makes one function with both halves (zmlx.patch.core), so each pattern keeps its
own flag, fidelity and report, and unpatching restores mlx-lm's class. Prompts run mlx-lm's
own layer. Prepared launches live outside the modules, per layer (`blocks_of`), and die
with it or when the model is unpatched (`forget`).
"""

from __future__ import annotations

import weakref
from functools import cache
from typing import Any, Callable, NamedTuple

# A module keeps its submodules and arrays as its dict's items: reading them as items
# (m["mlp"]) costs a dict lookup, as attributes (m.mlp) a failed attribute lookup first.


def stock_attention(layer, x, mask, cache):
    """mlx-lm's attention half: r."""
    return layer["self_attn"](layer["input_layernorm"](x), mask, cache)


class Routing(NamedTuple):
    """The family data's routing, handed to the MoE half: `renorm_eps` (a sigmoid MoEGate's);
    `softmax_first` and `topk_last` (a block that routes with a softmax in its own
    `__call__`: zmlx.patch.softmax_moe; softmax_first None for a gate module's routing)."""

    renorm_eps: float | None = None
    softmax_first: bool | None = None
    topk_last: bool | None = None
    mlp_name: str = "mlp"  # the layer's MoE (or MLP) module: Mixtral's is block_sparse_moe


def stock_moe(layer, x, r, routing: Routing = Routing()):
    """mlx-lm's MoE half: the layer's output from x and the attention's r."""
    h = x + r
    return h + layer[routing.mlp_name](layer["post_attention_layernorm"](h))


def make(
    attention: Callable | None = None,
    moe: Callable | None = None,
    renorm_eps: float | None = None,
    softmax_first: bool | None = None,
    topk_last: bool | None = None,
    mlp_name: str = "mlp",
):
    """The layer's `__call__` with these halves (None: mlx-lm's); the same function for the
    same halves, whatever the order of the arguments. The family data's routing (Routing)
    goes to the MoE half."""
    routing = Routing(renorm_eps, softmax_first, topk_last, mlp_name)
    return _make(attention or stock_attention, moe or stock_moe, routing)


@cache
def _make(attention: Callable, moe: Callable, routing: Routing):
    def __call__(self, x, mask=None, cache=None):
        if x.shape[-2] != 1:  # a prompt: mlx-lm's own layer
            return type(self).__zmlx_original__.__call__(self, x, mask, cache)
        return moe(self, x, attention(self, x, mask, cache), routing)

    return __call__


Registry = dict[int, tuple[weakref.ref, dict]]
# Every registry of prepared launches (the block patterns', zmlx.patch.module_calls'): unpatch
# drops a model's entries from each (`forget`), so that nothing prepared keeps holding its
# weights once it is unpatched (new weights loaded into it after would leave the old alive).
_REGISTRIES: list[Registry] = []


def registry() -> Registry:
    """A new registry of prepared launches, id(module) -> (weak reference, dict), that
    `forget` knows of."""
    out: Registry = {}
    _REGISTRIES.append(out)
    return out


def forget(modules) -> None:
    """Drop whatever any registry prepared for these modules."""
    for module in modules:
        for reg in _REGISTRIES:
            entry = reg.get(id(module))
            if entry is not None and entry[0]() is module:
                del reg[id(module)]


def blocks_of(registry: Registry, layer) -> dict[Any, Any]:
    """The dict of what a pattern prepared for `layer`, kept in the pattern's `registry`
    (id(layer) -> (weak reference, dict)) and dropped when the layer is gone: it holds the
    layer's weights, so it must not outlive the model."""
    entry = registry.get(id(layer))
    if entry is not None and entry[0]() is layer:
        return entry[1]
    blocks: dict = {}
    i = id(layer)

    def forget(_: weakref.ref) -> None:
        registry.pop(i, None)

    registry[i] = (weakref.ref(layer, forget), blocks)
    return blocks
