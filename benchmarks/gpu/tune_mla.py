#!/usr/bin/env python3
"""mla_attention's geometry on a GPU: per-kernel GPU µs for each (tensor-core path or not,
heads per warp, warps per threadgroup, target chunk count, least chunk) of mla_decode, at
GLM-4.7-Flash's attention shape.

    python benchmarks/gpu/tune_mla.py [--contexts 4096 32768] [--out DIR]

Each configuration sets the module's constants (the launch reads them), prints the fused
attention's largest difference from stock's bf16 result (a broken configuration stands out;
the `cuda` tests check the default one against float32 references) and takes the
profiler's per-kernel GPU time (zmlx.bench.kernels.breakdown). Stock's kernels are
listed once per context for comparison. Prints a table; writes tune_mla.json to --out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import mlx.core as mx
import typer

from zmlx import backend
from zmlx.bench import kernels as kb
from zmlx.kernels import mla_attention as mla

CONFIGS = [  # (USE_MMA, HEADS_PER_WARP, WARPS_PER_BLOCK, TARGET_CHUNKS, MIN_CHUNK)
    (True, 2, 10, 128, 32),
    (True, 2, 10, 64, 32),
    (True, 2, 10, 256, 16),
    (True, 2, 10, 32, 32),
    (True, 2, 10, 128, 64),
    (False, 2, 10, 128, 32),
    (False, 2, 5, 64, 32),
]
KNOBS = ("USE_MMA", "HEADS_PER_WARP", "WARPS_PER_BLOCK", "TARGET_CHUNKS", "MIN_CHUNK")


OUT = Path(os.environ.get("OUT", "."))


def _short(kernel: str) -> str:
    """A profiler kernel name without MLX's prefix (ours: `mla_decode_bfloat16_t...`)."""
    return kernel.split("zmlx_")[-1][:14] if "zmlx_" in kernel else kernel.split("::")[-1][:14]


def main(
    contexts: Annotated[list[int], typer.Option(help="cache lengths")] = [4096, 32768],  # noqa: B006
    out: Annotated[Path, typer.Option(help="where tune_mla.json goes")] = OUT,
):
    print(f"backend {backend.current()}")
    rows = []
    defaults = tuple(getattr(mla, k) for k in KNOBS)
    cases = [c for c in kb._attention_cases("glm47-flash", tuple(contexts)) if c.kernel.startswith("mla")]
    for case in cases:
        stock = kb.breakdown(case.stock)
        total = sum(us for _, _, us in stock)
        print(f"\n{case.shape}: stock {total:.1f} µs in {sum(n for _, n, _ in stock):.0f} launches")
        rows.append(
            {
                "shape": case.shape,
                "config": "stock",
                "gpu_us": total,
                "kernels": [[name, n, us] for name, n, us in stock],
            }
        )
        want = case.stock()
        for config in CONFIGS:
            for k, v in zip(KNOBS, config):
                setattr(mla, k, v)
            use_mma, hpw, wpb, target, least = config
            got = case.fused()
            err = mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()
            parts = kb.breakdown(case.fused)
            total = sum(us for _, _, us in parts)
            name = "mma" if use_mma else f"fma hpw {hpw} wpb {wpb:2d}"
            print(
                f"  {name:16s} chunks<={target:3d} >={least:3d}: {total:6.1f} µs, "
                f"max|Δ| vs stock {err:.2e}: " + ", ".join(f"{_short(k)} {us:.1f}" for k, _, us in parts)
            )
            rows.append(
                {
                    "shape": case.shape,
                    "config": dict(zip(KNOBS, config)),
                    "gpu_us": total,
                    "max_abs_diff_vs_stock": err,
                    "kernels": [[name, n, us] for name, n, us in parts],
                }
            )
    for k, v in zip(KNOBS, defaults):
        setattr(mla, k, v)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_mla.json").write_text(json.dumps({"device": backend.device_name(), "rows": rows}, indent=1))
    print(f"\nwrote {out / 'tune_mla.json'}")


if __name__ == "__main__":
    typer.run(main)
