"""moe_router: DeepSeek-style sigmoid routing (GLM-4.7-Flash's `MoEGate`).

sigmoid(gates) in float32; the correction bias is added for selection only; top-k
(optionally within the best `topk_group` of `n_group` groups); gather of the
unbiased scores; renormalize (with the family's epsilon); routed scaling.

The kernel does all of it after the gate matmul in one launch, one 32-lane warp per
token (E <= 256 experts, k <= 8), and is bitwise the stock sequence because it follows
MLX's own arithmetic (read from MLX's CUDA and Metal sources):
- sigmoid as MLX's unary op: y = 1 / (1 + exp(|x|)), then x < 0 ? y : 1 - y;
- `argpartition` on the GPU is a full *stable* merge sort of `-scores` (NaN last),
  so the k chosen come in descending score order with ties to the lower expert
  index: k rounds of "best remaining" (per lane, then a warp butterfly on the pair
  (sort position, index), which every lane ends with);
- the sum of the k gathered scores is MLX's row reduce: each thread sums 4 floats in
  order from 0, then the partial sums are added (k <= 8: two partials);
- the renormalize and scaling are separate float32 ops (no FMA can form).
Group-limited routing (DeepSeek-V3: 8 groups of consecutive experts, the best 4 kept) is
mlx-lm's: a group's score is the sum of its two largest biased scores (`mx.topk` is a
partition, so only the two values count); the `n_group - topk_group` groups first in the
GPU's stable ascending sort of those sums (NaN last, ties to the lower group) have their
biased scores set to 0.0 (not removed: such an expert can still be chosen when kept
scores are negative); then the same top-k as with one group.

Device code: csrc/moe_router.h (MLX's sigmoid, its sort orders `zmlx_less`/`zmlx_before`,
the group step `zmlx_limit_groups`, and the whole routing of one token by one warp,
`zmlx_route_warp`, which norm_router and moe_gate_up_route call too) and
csrc/moe_router_body.h (the body: one warp per token).
"""

from __future__ import annotations

import math

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code, float_bits


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
    return _route(gates, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob, renorm_eps)


_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def groups_reason(experts: int, n_group: int, topk_group: int) -> str | None:
    """Why the router kernels do not take this grouping, or None: groups of >= 2 experts
    (mx.topk of 2 per group), at most 32 of them (a bitmask), 1 <= topk_group <= n_group."""
    if n_group == 1:
        return None
    if not (1 < n_group <= 32 and experts % n_group == 0 and experts // n_group >= 2):
        return f"{experts} experts in {n_group} groups (the kernel takes <= 32 groups of >= 2 experts)"
    if not 1 <= topk_group <= n_group:
        return f"topk_group={topk_group} of {n_group} groups"
    return None


def launch(
    backend,
    gates,
    bias,
    *,
    top_k,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    norm_topk_prob=True,
    renorm_eps=None,
) -> Launch | Skip:
    if gates.ndim < 1 or gates.dtype not in _DTYPES or bias.dtype not in _DTYPES:
        return Skip(f"gates {gates.dtype}, bias {bias.dtype}")
    e = gates.shape[-1]
    if bias.shape != (e,):
        return Skip(f"bias of shape {bias.shape} for {e} experts")
    if not (1 <= e <= 256 and 1 <= top_k <= min(8, e)):
        return Skip(f"{e} experts, top-{top_k} (the kernel takes <= 256 experts, top-k <= 8)")
    if (why := groups_reason(e, n_group, topk_group)) is not None:
        return Skip(why)
    rows = math.prod(gates.shape[:-1])
    if rows == 0:
        return Skip("no tokens")
    return Launch(
        inputs=[gates, bias],
        template=[
            ("E", e),
            ("K", top_k),
            ("N_GROUP", n_group),
            ("TOPK_GROUP", topk_group if n_group > 1 else 1),
            ("ROWS", rows),
            ("NORM", top_k > 1 and bool(norm_topk_prob)),
            ("HAS_EPS", renorm_eps is not None),
            ("EPS_BITS", float_bits(renorm_eps or 0.0)),
            ("SCALE_BITS", float_bits(routed_scaling_factor)),
        ],
        grid=(rows * 32, 1, 1),
        threadgroup=(32 * min(8, rows), 1, 1),
        output_shapes=[gates.shape[:-1] + (top_k,)] * 2,
        output_dtypes=[mx.uint32, mx.float32],
    )


def example():
    # GLM-4.7-Flash's routing on 3 tokens, with ties among the biased scores.
    gates = (mx.round(mx.random.normal((3, 64), key=mx.random.key(21)) * 2) / 2).astype(mx.bfloat16)
    bias = mx.round(mx.random.normal((64,), key=mx.random.key(22)) * 4) / 64
    bias = mx.where(mx.arange(64) % 2 == 0, 0.0, bias)
    kwargs = dict(top_k=4, routed_scaling_factor=1.8, norm_topk_prob=True, renorm_eps=1e-20)
    return (gates, bias), kwargs


moe_router = KernelDef(
    name="moe_router",
    reference=reference,
    body=device_code("moe_router_body.h"),
    header=device_code("moe_router.h"),
    input_names=("gates", "bias"),
    output_names=("inds", "scores"),
    launch=launch,
    example=example,
)
