"""The softmax-routed MoE block's `__call__` that softmax_router and downproj_combine share.

mlx-lm's Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock and gpt-oss's MLPBlock route inside
their own `__call__` (no gate module), in two pieces:

    inds, scores = route(gates)                      # softmax, top-k, gather (renormalize)
    y = combine(switch_mlp(x, inds), scores)         # the experts, then the weighted sum

softmax_router supplies the routing (its kernel), downproj_combine the experts' down
projection and the weighted sum at decode (one launch; scores in the activations' dtype);
a piece no pattern supplies is mlx-lm's op sequence. Each pattern names its piece as its
`Pattern.part` ("route", "combine") and both have this module's `make` behind their make():
on a block that both patch, the registry makes one function with both pieces
(zmlx.patch.core), so each keeps its own flag, fidelity and report. The family data says
which routing a block runs (`softmax_first`, `topk_last`: zmlx.kernels.softmax_router).
"""

from __future__ import annotations

from functools import cache
from typing import Callable

import mlx.core as mx
from mlx.nn.layers.distributed import sum_gradients

from zmlx.kernels import softmax_router as kernel

# (softmax_first, topk_last) -> the block: Qwen3-MoE, Mixtral, gpt-oss
QWEN3, MIXTRAL, GPT_OSS = (True, True), (False, False), (False, True)


def kind_of(softmax_first: bool, topk_last: bool | None) -> tuple[bool, bool]:
    return bool(softmax_first), kernel.topk_last_of(softmax_first, topk_last)


def routing(block, kind: tuple[bool, bool]) -> dict:
    """The block's routing as softmax_router (kernel and reference) takes it: k, the softmax
    order, Qwen3-MoE's renormalization, gpt-oss's top-k convention (Mixtral's is the default)."""
    if kind == QWEN3:
        return dict(top_k=block.top_k, softmax_first=True, norm_topk_prob=block.norm_topk_prob)
    return dict(
        top_k=block.num_experts_per_tok,
        softmax_first=False,
        **({"topk_last": True} if kind == GPT_OSS else {}),
    )


def stock_route(block, gates, kind: tuple[bool, bool]):
    """mlx-lm's routing op sequence: (inds, scores in the gates' dtype)."""
    return kernel.reference(gates, **routing(block, kind))


def stock_combine(block, x, inds, scores, kind: tuple[bool, bool]):
    """mlx-lm's experts and weighted sum (Qwen3-MoE casts the sum to y's dtype)."""
    y = block["switch_mlp"](x, inds)
    out = (y * scores[..., None]).sum(axis=-2)
    return out.astype(y.dtype) if kind == QWEN3 else out


def make(
    softmax_first: bool,
    topk_last: bool | None = None,
    route: Callable | None = None,
    combine: Callable | None = None,
    shared_overlap: bool = False,  # downproj_combine's option; these blocks have no shared expert
) -> Callable:
    """The block's `__call__` with these pieces (None: mlx-lm's); the same function for the
    same pieces, whatever the order of the arguments."""
    return _make(kind_of(softmax_first, topk_last), route, combine)


@cache
def _make(kind: tuple[bool, bool], route: Callable | None, combine: Callable | None):
    route = route or stock_route
    combine = combine or stock_combine
    if kind == GPT_OSS:  # its experts have biases: no combine piece applies (downproj_combine's check)

        def gpt_oss_call(self, x):  # gpt-oss's MLPBlock.__call__
            if self.sharding_group is not None:
                x = sum_gradients(self.sharding_group)(x)
            indices, expert_weights = route(self, self.router(x), kind)
            x = self.experts(x, indices)
            y = (x * mx.expand_dims(expert_weights, axis=-1)).sum(axis=-2)
            if self.sharding_group is not None:
                y = mx.distributed.all_sum(y, group=self.sharding_group)
            return y

        return gpt_oss_call

    def __call__(self, x):  # Qwen3MoeSparseMoeBlock's and MixtralSparseMoeBlock's
        group = getattr(self, "sharding_group", None)
        if group is not None:
            x = sum_gradients(group)(x)
        inds, scores = route(self, self["gate"](x), kind)
        y = combine(self, x, inds, scores, kind)
        if group is not None:
            y = mx.distributed.all_sum(y, group=group)
        return y

    return __call__
