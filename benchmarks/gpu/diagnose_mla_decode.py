#!/usr/bin/env python3
"""mla_decode alone on a GPU: GPU µs per call over a sweep of chunk sizes, heads per warp and
positions per step, at GLM-4.7-Flash's attention shape (20 heads, latent 512, rope 64).

    python benchmarks/gpu/diagnose_mla_decode.py [--context 4096] [--once HPW,CH]

Each row: the configuration, threadgroups, GPU µs (profiler, 20 calls), and the largest
difference from the float32 reference (a wrong configuration shows). `--once HPW,CH` runs
one configuration a few times and nothing else (for `ncu`).
"""

from __future__ import annotations

import math
from typing import Annotated

import mlx.core as mx
import typer

from zmlx import backend
from zmlx.bench import kernels as kb
from zmlx.kernels import mla_attention as mla


def inputs(context: int):
    ks = mx.random.split(mx.random.key(3), 4)
    qv = mx.random.normal((1, 20, 512), key=ks[0]) * 4
    q_pe = (mx.random.normal((1, 20, 1, 64), key=ks[1]) * 0.1).astype(mx.bfloat16)
    lat = mx.random.normal((1, 1, context, 512), key=ks[2]).astype(mx.bfloat16)
    kpe = mx.random.normal((1, 1, context, 64), key=ks[3]).astype(mx.bfloat16)
    mx.eval(qv, q_pe, lat, kpe)
    return qv, q_pe, lat, kpe


def main(
    context: Annotated[int, typer.Option()] = 4096,
    once: Annotated[str, typer.Option(help="HPW,CH: one configuration only")] = "",
):
    qv, q_pe, lat, kpe = inputs(context)
    scale = 256**-0.5
    if once:
        hpw, ch = (int(v) for v in once.split(","))
        mla.HEADS_PER_WARP, mla.MIN_CHUNK, mla.TARGET_CHUNKS = hpw, ch, 10**9  # mma for bf16
        for _ in range(5):
            mx.eval(mla.mla_decode(qv, q_pe, lat, kpe, scale=scale))
        return
    print(f"backend {backend.current()} {backend.device_name()}  context {context}")
    for use_mma, tp, hpw in ((True, 4, 2), (False, 4, 2), (False, 4, 1)):
        for ch in (16, 32, 48, 64, 96, 128, 256):
            mla.USE_MMA, mla.TP, mla.HEADS_PER_WARP = use_mma, tp, hpw
            mla.MIN_CHUNK, mla.TARGET_CHUNKS = ch, 10**9
            got = mla.mla_decode(qv, q_pe, lat, kpe, scale=scale)
            want = mla.decode_reference(qv, q_pe, lat, kpe, scale=scale)
            err = max(mx.abs(g - w).max().item() / (1 + mx.abs(w).max().item()) for g, w in zip(got, want))
            parts = kb.breakdown(lambda: mla.mla_decode(qv, q_pe, lat, kpe, scale=scale))
            us = sum(u for _, _, u in parts)
            groups = 1 if use_mma else math.ceil(20 / (hpw * min(10, math.ceil(20 / hpw))))
            blocks = math.ceil(context / ch) * groups
            name = "mma" if use_mma else f"fma TP {tp} HPW {hpw}"
            print(
                f"{name:16s} CH {ch:4d}: {blocks:4d} threadgroups  {us:8.1f} µs  rel err {err:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    typer.run(main)
