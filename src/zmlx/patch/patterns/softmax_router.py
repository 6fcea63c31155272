"""softmax_router: the softmax routing of Qwen3-MoE's and Mixtral's sparse MoE blocks in one
launch (exact on CUDA and the CPU, close on Metal).

Patches the block's `__call__` (Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock): mlx-lm's
own code in its order, with the ops between the gate matmul and switch_mlp (the softmax,
argpartition and its slice, take_along_axis, and Qwen3-MoE's sum and divide) replaced by the
softmax_router kernel. The gate, switch_mlp (which moe_mlp patches) and the weighted sum stay
mlx-lm's calls. Prompts and decode steps alike. The family data says which routing a block
runs (`softmax_first`: Qwen3-MoE's softmax over the experts, then top-k; Mixtral's top-k of
the logits, then their softmax)."""

from __future__ import annotations

from functools import cache

import mlx.core as mx
from mlx.nn.layers.distributed import sum_gradients

from zmlx.kernels.softmax_router import shape_reason, softmax_router
from zmlx.patch.pattern import Pattern

# the attributes each block's stock __call__ reads
_ATTRS = {
    True: ("gate", "switch_mlp", "top_k", "norm_topk_prob"),
    False: ("gate", "switch_mlp", "num_experts_per_tok"),
}


def _top_k(block, softmax_first: bool) -> int:
    return block.top_k if softmax_first else block.num_experts_per_tok


def check(block, params) -> str | None:
    softmax_first = params.get("softmax_first")
    if softmax_first is None:
        return "the family data names no routing (softmax_first)"
    missing = [a for a in _ATTRS[bool(softmax_first)] if not hasattr(block, a)]
    if missing:
        return f"{type(block).__name__} has no {', '.join(missing)}: not mlx-lm's sparse MoE block"
    gate = block.gate
    if "weight" not in gate or "bias" in gate:
        return f"gate is a {type(gate).__name__} with a bias or without weights"
    dtype = gate["scales"].dtype if "scales" in gate else gate.weight.dtype
    return shape_reason(gate.weight.shape[0], _top_k(block, bool(softmax_first)), dtype)


@cache
def make(softmax_first: bool):
    return _qwen3_call if softmax_first else _mixtral_call


def _qwen3_call(self, x):  # Qwen3MoeSparseMoeBlock.__call__, the routing fused
    group = getattr(self, "sharding_group", None)
    if group is not None:
        x = sum_gradients(group)(x)
    gates = self.gate(x)
    inds, scores = softmax_router(
        gates, top_k=self.top_k, softmax_first=True, norm_topk_prob=self.norm_topk_prob
    )
    y = self.switch_mlp(x, inds)
    y = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
    if group is not None:
        y = mx.distributed.all_sum(y, group=group)
    return y


def _mixtral_call(self, x):  # MixtralSparseMoeBlock.__call__, the routing fused
    gates = self.gate(x)
    inds, scores = softmax_router(gates, top_k=self.num_experts_per_tok, softmax_first=False)
    y = self.switch_mlp(x, inds)
    return (y * scores[..., None]).sum(axis=-2)


PATTERN = Pattern(
    name="softmax_router",
    summary="Qwen3-MoE / Mixtral MoE block: softmax, top-k, gather (and renormalize) in one launch",
    fidelity="close",
    kernels=(softmax_router,),
    check=check,
    make=make,
)
