#!/usr/bin/env python3
"""A target for Nsight Compute: the micro-benchmark's fused kernels at GLM-4.7-Flash's decode
shapes (zmlx.bench.kernels' cases at one token), each called a few times, nothing else timed.

    ncu --kernel-name regex:"moe_gate_up_route|mla_q_prep" --launch-skip 0 --launch-count 12 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        --section SchedulerStats --section LaunchStats \\
        python3 benchmarks/gpu/ncu_target.py --only moe_gate_up_route --only mla_q_prep

`--only` takes the case names of `benchmarks/bench_kernels.py`'s table (without "(close)" or
"(prepared)"); `--calls` how many times each is called. Each kernel's self-check runs first
(on its small example), so skip those launches or count past them. Bad input: one line,
exit 2. Needs the CUDA backend (ncu is at /usr/local/cuda/bin/ncu on the GPU machine).
"""

from __future__ import annotations

import sys
from typing import Annotated

import mlx.core as mx
import typer

from zmlx import backend
from zmlx.bench import kernels as kb


def main(
    only: Annotated[list[str], typer.Option(help="case names (repeatable)")] = [],  # noqa: B006
    calls: Annotated[int, typer.Option(help="calls of each case")] = 3,
):
    if backend.current() != "cuda":
        print(f"error: ncu_target runs CUDA kernels; this is MLX's {backend.current()} backend")
        raise typer.Exit(2)
    if calls < 1:
        print(f"error: --calls must be at least 1, got {calls}")
        raise typer.Exit(2)
    try:
        cases = kb.cases((1,), only=only or None)
    except ValueError as e:  # an unknown name
        print(f"error: {e}")
        raise typer.Exit(2) from None
    cases = [c for c in cases if "(prepared)" not in c.kernel]
    for case in cases:
        for _ in range(calls):
            mx.eval(case.fused())
        print(f"{case.kernel}: {case.shape}, {calls} calls", flush=True)


if __name__ == "__main__":
    sys.exit(typer.run(main))
