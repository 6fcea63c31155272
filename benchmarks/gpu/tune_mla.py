#!/usr/bin/env python3
"""mla_attention's geometry on a GPU: per-kernel GPU µs for each (heads per warp, warps per
threadgroup, target chunk count) of mla_decode, at GLM-4.7-Flash's attention shape.

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

CONFIGS = [  # (HEADS_PER_WARP, WARPS_PER_BLOCK, TARGET_CHUNKS)
    (2, 10, 64), (1, 10, 64), (2, 5, 64), (2, 10, 128), (1, 10, 128), (2, 10, 32), (4, 5, 64),
]


OUT = Path(os.environ.get("OUT", "."))


def main(contexts: Annotated[list[int], typer.Option(help="cache lengths")] = [4096, 32768],  # noqa: B006
         out: Annotated[Path, typer.Option(help="where tune_mla.json goes")] = OUT):
    print(f"backend {backend.current()}")
    rows = []
    defaults = (mla.HEADS_PER_WARP, mla.WARPS_PER_BLOCK, mla.TARGET_CHUNKS)
    cases = [c for c in kb._attention_cases("glm47-flash", tuple(contexts)) if c.kernel.startswith("mla")]
    for case in cases:
        stock = kb.breakdown(case.stock)
        total = sum(us for _, _, us in stock)
        print(f"\n{case.shape}: stock {total:.1f} µs in {sum(n for _, n, _ in stock):.0f} launches")
        rows.append({"shape": case.shape, "config": "stock", "gpu_us": total,
                     "kernels": [[name, n, us] for name, n, us in stock]})
        want = case.stock()
        for hpw, wpb, target in CONFIGS:
            mla.HEADS_PER_WARP, mla.WARPS_PER_BLOCK, mla.TARGET_CHUNKS = hpw, wpb, target
            got = case.fused()
            err = mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()
            parts = kb.breakdown(case.fused)
            total = sum(us for _, _, us in parts)
            print(f"  hpw {hpw} wpb {wpb:2d} chunks<={target:3d}: {total:6.1f} µs, "
                  f"max|Δ| vs stock {err:.2e}: "
                  + ", ".join(f"{name[:28]} {us:.1f}" for name, _, us in parts))
            rows.append({"shape": case.shape, "config": {"heads_per_warp": hpw, "warps_per_block": wpb,
                                                          "target_chunks": target},
                         "gpu_us": total, "max_abs_diff_vs_stock": err,
                         "kernels": [[name, n, us] for name, n, us in parts]})
    mla.HEADS_PER_WARP, mla.WARPS_PER_BLOCK, mla.TARGET_CHUNKS = defaults
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_mla.json").write_text(json.dumps({"device": backend.device_name(), "rows": rows}, indent=1))
    print(f"\nwrote {out / 'tune_mla.json'}")


if __name__ == "__main__":
    typer.run(main)
