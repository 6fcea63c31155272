"""moe_combine: the MoE block's weighted sum of expert outputs plus the shared expert."""

from __future__ import annotations

from functools import cache

from zmlx.kernels.moe_combine import moe_combine
from zmlx.patch.pattern import Pattern


def check(moe, params) -> str | None:
    if getattr(moe, "sharding_group", None) is not None:
        return "MoE is sharded across devices (distributed runs are not supported)"
    return None


@cache
def make():
    def __call__(self, x):
        inds, scores = self.gate(x)
        y = self.switch_mlp(x, inds)
        shared = self.shared_experts(x) if self.config.n_shared_experts is not None else None
        return moe_combine(y, scores, shared)

    return __call__


PATTERN = Pattern(
    name="moe_combine",
    summary="MoE block: routed experts' weighted sum + shared expert",
    fidelity="exact",
    kernels=(moe_combine,),
    check=check,
    make=make,
)
