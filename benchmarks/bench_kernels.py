#!/usr/bin/env python3
"""Per-kernel micro-benchmark: each fused kernel vs the stock op sequence it replaces.

    python benchmarks/bench_kernels.py --iters 200 --repeats 7

GLM-4.7-Flash shapes at decode (1 token) and a 32-token prompt. On the CUDA backend
with PyTorch installed: GPU time per call from device timestamps (profiler), launches
per call, and host wall time per call; elsewhere wall time only. Writes a capsule
(`kernels` rows instead of variants) under --capsule-dir; `python -m zmlx.bench.report`
prints it. See zmlx.bench.kernels for what each figure means, zmlx.bench.overhead for the
custom-call overhead diagnostic.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from zmlx import backend, ui
from zmlx.bench import capsule, kernels, stamp
from zmlx.bench.overhead import overhead as measure_overhead
from zmlx.cli.report import kernels_table, overhead_table


def main(
    iters: Annotated[int, typer.Option(help="calls per timed block")] = 200,
    repeats: Annotated[int, typer.Option(help="timed blocks per side (median taken)")] = 7,
    capsule_dir: Annotated[Path, typer.Option(help="where the capsule is written")] = Path("repro_capsules"),
    only: Annotated[list[str] | None, typer.Option(help="only these kernels' cases (repeatable)")] = None,
    overhead: Annotated[bool, typer.Option(help="also the custom-call overhead diagnostic (CUDA)")] = True,
    breakdown: Annotated[bool, typer.Option(help="print each case's kernels by GPU time (CUDA)")] = False,
):
    from rich.console import Console
    from rich.progress import Progress

    if iters < 1 or repeats < 1:
        print("error: --iters and --repeats must be at least 1", file=sys.stderr)
        raise typer.Exit(2)
    try:
        git = stamp.git()
    except stamp.GitStateError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    err = Console(stderr=True)
    with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("kernels", total=None)
        try:
            rows = kernels.run(
                iters=iters,
                repeats=repeats,
                only=only,
                progress=lambda what: progress.update(task, description=what),
            )
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None
    cap = capsule.build(
        name="kernel_microbench",
        model={
            "name": "kernels-glm47-flash-shapes",
            "kind": "kernels",
            "family": "glm4_moe_lite",
            "quantization": None,
        },
        params={"iters": iters, "repeats": repeats, "backend": backend.current(), "only": only},
        variants=[],
        git=git,
    )
    cap["kernels"] = rows
    cap["kernel_fallbacks"] = kernels.fallbacks()  # a failed self-check: its "fused" side ran the reference
    # [] off CUDA or when not asked for
    cap["custom_call_overhead"] = measure_overhead(iters=iters, repeats=repeats) if overhead else []
    path = capsule.write(cap, capsule_dir)
    console = ui.console()
    console.print(kernels_table(rows, f"{path.name} on {cap['device']['name']}"))
    for name, reason in cap["kernel_fallbacks"].items():
        console.print(f"[bold red]fallback:[/] {name} ran its reference: {reason}")
    if cap["custom_call_overhead"]:
        console.print(overhead_table(cap["custom_call_overhead"], "custom-call overhead (per call)"))
    if breakdown and backend.current() == "cuda":
        for case in kernels.cases(only=only):
            for side, fn in (("stock", case.stock), ("fused", case.fused)):
                print(f"-- {case.kernel} | {case.shape} | {side}")
                for name, n, us in kernels.breakdown(fn):
                    print(f"   {us:8.2f} µs  x{n:4.1f}  {name}")
    print(f"capsule: {path}")


if __name__ == "__main__":
    ui.run_command(main)
