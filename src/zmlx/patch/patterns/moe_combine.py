"""moe_combine: the MoE block's weighted sum of expert outputs plus the shared expert.

With `ZMLX_MOE_SHARED_EXPERTS_OVERLAP=1` (an experiment, off by default) the shared expert
runs on a second stream, so the GPU may run it alongside the routed experts; the values
are the same either way (same ops, only the stream differs)."""

from __future__ import annotations

from functools import cache

from zmlx.distributed import moe_input, moe_output
from zmlx.kernels.moe_combine import moe_combine
from zmlx.patch.moe import shared_expert
from zmlx.patch.pattern import Pattern


def check(moe, params) -> str | None:
    return None  # tensor-parallel MoEs too: the all-sum stays after the combine, as mlx-lm's


@cache
def make(shared_overlap: bool = False):
    def __call__(self, x):
        x = moe_input(self, x)
        inds, scores = self.gate(x)
        y = self.switch_mlp(x, inds)
        return moe_output(self, moe_combine(y, scores, shared_expert(self, x, shared_overlap)))

    return __call__


PATTERN = Pattern(
    name="moe_combine",
    summary="MoE block: routed experts' weighted sum + shared expert",
    fidelity="exact",
    kernels=(moe_combine,),
    check=check,
    make=make,
    options=("shared_overlap",),
)
