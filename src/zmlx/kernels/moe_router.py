"""moe_router: DeepSeek-style sigmoid routing (GLM-4.7-Flash's `MoEGate`).

sigmoid(gates) in float32; the correction bias is added for selection only; top-k
(optionally within the best `topk_group` of `n_group` groups); gather of the
unbiased scores; renormalize (with the family's epsilon); routed scaling.
"""

from __future__ import annotations

import mlx.core as mx

from zmlx.kernels._core import KernelDef


@mx.compile
def _route(gates, bias, top_k, n_group, topk_group, scaling, norm_topk_prob, renorm_eps):
    # mlx-lm's op sequence, dtype by dtype, compiled like mlx-lm compiles it, so the
    # result is bitwise equal to the stock router on every backend.
    scores = mx.sigmoid(gates.astype(mx.float32))
    orig_scores = scores
    scores = scores + bias
    if n_group > 1:
        scores = mx.unflatten(scores, axis=-1, shape=(n_group, -1))
        group_scores = mx.topk(scores, 2, axis=-1).sum(axis=-1, keepdims=True)
        k = n_group - topk_group
        group_idx = mx.argpartition(group_scores, kth=k - 1, axis=-2)[..., :k, :]
        scores = mx.put_along_axis(scores, mx.stop_gradient(group_idx), mx.array(0.0), axis=-2)
        scores = mx.flatten(scores, -2, -1)
    inds = mx.stop_gradient(mx.argpartition(-scores, kth=top_k - 1, axis=-1)[..., :top_k])
    scores = mx.take_along_axis(orig_scores, inds, axis=-1)
    if top_k > 1 and norm_topk_prob:
        denominator = scores.sum(axis=-1, keepdims=True)
        if renorm_eps is not None:
            denominator = denominator + renorm_eps
        scores = scores / denominator
    return inds, scores * scaling


def reference(
    gates: mx.array,
    bias: mx.array,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    norm_topk_prob: bool = True,
    renorm_eps: float | None = None,
) -> tuple[mx.array, mx.array]:
    """gates (..., E) any float dtype, bias (E,) float32 -> (inds (..., k) uint32,
    scores (..., k) float32)."""
    return _route(
        gates, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob, renorm_eps
    )


moe_router = KernelDef(name="moe_router", reference=reference)
