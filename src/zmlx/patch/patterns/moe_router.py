"""moe_router: the MoE gate's routing (sigmoid, biased top-k, renorm, scaling)."""

from __future__ import annotations

from functools import cache

from zmlx.kernels.moe_router import moe_router
from zmlx.patch.moe import router_reason
from zmlx.patch.pattern import Pattern


def check(gate, params) -> str | None:
    return router_reason(gate)


@cache
def make(renorm_eps: float | None = None):
    def __call__(self, x):
        return moe_router(
            x @ self.weight.T,
            self.e_score_correction_bias,
            top_k=self.top_k,
            n_group=self.n_group,
            topk_group=self.topk_group,
            routed_scaling_factor=self.routed_scaling_factor,
            norm_topk_prob=self.norm_topk_prob,
            renorm_eps=renorm_eps,
        )

    return __call__


PATTERN = Pattern(
    name="moe_router",
    summary="MoE gate: sigmoid, biased top-k, renormalize, routed scaling",
    fidelity="exact",
    kernels=(moe_router,),
    check=check,
    make=make,
)
