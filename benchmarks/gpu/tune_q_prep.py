#!/usr/bin/env python3
"""mla_q_prep's geometry on a GPU: GPU µs per call for each (EMBED_SLICES, RQ) at
GLM-4.7-Flash's attention shape (20 heads, q_lora_rank 768, nope 192, rope 64, latent 512;
affine 4-bit, group 64, bf16), and mla_q_prep_nope's for each RQ.

    python benchmarks/gpu/tune_q_prep.py [--out DIR]

Each configuration sets the module's constants (the launch reads them) and must give
bitwise the outputs of (1, 1), the geometry before the slices (each row's arithmetic is the
same; the `cuda` tests check it on more shapes); a configuration that does not is marked.
Prints a table; writes tune_q_prep.json to --out (default $OUT or .).
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
from zmlx.kernels import mla_q_prep as mod
from zmlx.kernels.glm47_rope import rope_table

CONFIGS = [(1, 1), (1, 4), (2, 4), (4, 1), (4, 2), (4, 4), (8, 4), (4, 8)]  # (EMBED_SLICES, RQ)
OUT = Path(os.environ.get("OUT", "."))


def _problem():
    p = dict(group_size=64, bits=4)
    args = mod.inputs(1, 20, 768, 192, 64, 512, mx.bfloat16, 7, packing=p, embed_packing=p)
    kw = mod.kwargs(20, 192, 64, packing=p, embed_packing=p)
    full = (*args, rope_table(64, kw["base"], 1.0, 5000), 4096)
    nope_kw = {k: v for k, v in kw.items() if not k.startswith("embed_")}
    return full, kw, (*args[:7], *full[10:]), nope_kw


def main(out: Annotated[Path, typer.Option(help="where tune_q_prep.json goes")] = OUT):
    if backend.current() != "cuda":
        print(f"error: tune_q_prep times CUDA kernels; this is MLX's {backend.current()} backend")
        raise typer.Exit(2)
    full, kw, nope, nope_kw = _problem()
    defaults = (mod.EMBED_SLICES, mod.RQ)
    rows, base = [], None
    for slices, rq in CONFIGS:
        mod.EMBED_SLICES, mod.RQ = slices, rq
        outs = []
        for name, kernel, args, k in (
            ("mla_q_prep", mod.mla_q_prep, full, kw),
            ("nope", mod.mla_q_prep_nope, nope, nope_kw),
        ):
            if name == "nope" and slices != 1:
                continue  # the nope variant has no embed slices

            def call(kernel=kernel, args=args, k=k):
                return kernel.run_kernel("cuda", *args, init_value=float("nan"), **k)

            got = call()
            mx.eval(got)
            outs.append(got)
            us = sum(u for _, _, u in kb.breakdown(call))
            rows.append({"kernel": name, "embed_slices": slices, "rq": rq, "gpu_us": us})
        if base is None:
            base = outs
        same = all(mx.array_equal(a, b).item() for o, bo in zip(outs, base) for a, b in zip(o, bo))
        for r in rows[-len(outs) :]:
            r["bitwise_as_1_1"] = same
            print(
                f"{r['kernel']:<12} ES {slices} RQ {rq}: {r['gpu_us']:7.1f} µs  "
                + ("same" if same else "DIFFERS")
            )
    mod.EMBED_SLICES, mod.RQ = defaults
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_q_prep.json").write_text(
        json.dumps({"device": backend.device_name(), "rows": rows}, indent=1)
    )
    print(f"wrote {out / 'tune_q_prep.json'}")


if __name__ == "__main__":
    typer.run(main)
