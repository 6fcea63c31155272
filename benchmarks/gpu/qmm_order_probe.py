#!/usr/bin/env python3
"""Whether MLX's qmm_sm80 can be followed bitwise by a kernel of zmlx's (a probe).

    python benchmarks/gpu/qmm_order_probe.py [--out DIR]

On CUDA stock's quantized matmul leaves its qmv for qmm_sm80 once rows x batches reach 8:
gather_qmm over 8 experts at decode (Qwen3-MoE, GLM-4.5-Air, DeepSeek-V3: top-8, so zmlx's
expert kernels, which follow qmv, leave those layers to stock) and MultiLinear's embed_q /
unembed_out over GLM-4.7-Flash's 20 heads (2 of the ~12 stock kernels a layer left under the
default preset). The qmm_rows kernel (csrc/qmm_order.h) computes each output in qmm_sm80's
order as read from MLX's source (weights dequantized in T, mma.sync m16n8k16 over k-blocks of
16 in order); if that is the whole story, it is bitwise stock, and the expert and attention
kernels can take it.

Each case runs stock (mx.gather_qmm, or mx.quantized_matmul batched over heads) and the probe
kernel on the same inputs and compares them bitwise: one line a case, PASS or FAIL with the
largest difference and the count of differing elements. A case at fewer than 8 rows x batches
is a control: stock runs qmv there, so a FAIL is expected.

Where a case fails, the next line says which arithmetic each side follows: stock's and the
kernel's outputs are compared with the exact sums (float64, rounded once to T) over three
dequantizations of the same weights: T(T(q*s)+b) (qmm_sm80 as read: T's product, then T's
sum), T(q*s+b) (one rounding) and q*s+b in float (none). A side that follows one of them
differs from it only where float32 accumulation moved a value across a rounding boundary
(a few per cent); ~half the elements differ from the others. Writes a new
qmm_order_probe-<time>.json into --out (default $OUT or .). Needs MLX's CUDA backend (else one line, exit 2).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import mlx.core as mx
import numpy as np
import typer

from zmlx import backend
from zmlx.bench import capsule
from zmlx.kernels.qmm_rows import STOCK_QMM_ROWS, qmm_rows, reference

OUT = Path(os.environ.get("OUT", "."))

# (name, kind, dtype, batches L, experts E, N, K, bits, group)
CASES = [
    ("qwen3 gate/up top-8, 4-bit g64", "gather", mx.bfloat16, 8, 16, 768, 2048, 4, 64),
    ("qwen3 down top-8, 4-bit g64", "gather", mx.bfloat16, 8, 16, 2048, 768, 4, 64),
    ("gather 8, 4-bit g32", "gather", mx.bfloat16, 8, 12, 512, 1024, 4, 32),
    ("gather 8, 4-bit g128", "gather", mx.bfloat16, 8, 12, 512, 1024, 4, 128),
    ("gather 8, 8-bit g64", "gather", mx.bfloat16, 8, 12, 512, 1024, 8, 64),
    ("gather 8, half, 4-bit g64", "gather", mx.float16, 8, 12, 512, 1024, 4, 64),
    ("glm embed_q, 20 heads", "heads", mx.bfloat16, 20, 20, 512, 192, 4, 64),
    ("glm unembed_out, 20 heads", "heads", mx.bfloat16, 20, 20, 256, 512, 4, 64),
    ("control: gather 4 (stock's qmv)", "gather", mx.bfloat16, 4, 12, 512, 1024, 4, 64),
]


def inputs(kind, dtype, batches, experts, n, k, bits, group, seed=0):
    """(args, kwargs) of one case: a single activation row for "gather" (8 experts of one
    token; lhs all 0), one row per head for "heads" (lhs = rhs = the head)."""
    ks = mx.random.split(mx.random.key(seed), 3)
    rows = 1 if kind == "gather" else batches
    x = mx.random.normal((rows, 1, k), key=ks[0]).astype(dtype)
    w, s, b = mx.quantize(
        (0.05 * mx.random.normal((experts, n, k), key=ks[1])).astype(dtype), group_size=group, bits=bits
    )
    if kind == "gather":
        lhs = mx.zeros((batches,), dtype=mx.uint32)
        rhs = mx.random.permutation(experts, key=ks[2])[:batches].astype(mx.uint32)
    else:
        lhs = rhs = mx.arange(batches, dtype=mx.uint32)
    return (x, w, s, b, lhs, rhs), dict(group_size=group, bits=bits)


def stock(kind, args, kw):
    """Stock's op as the model calls it: gather_qmm (SwitchGLU), or quantized_matmul batched
    over the heads (MultiLinear)."""
    x, w, s, b, lhs, rhs = args
    if kind == "gather":
        return reference(*args, **kw)
    return mx.quantized_matmul(x, w, s, b, transpose=True, **kw).reshape(lhs.size, -1)


def dequantized(w, s, b, *, group_size, bits, dtype) -> dict[str, np.ndarray]:
    """The weights (E, N, K) as float64 under three dequantizations (module docstring)."""
    words = np.array(w)
    q = (words[..., None] >> (np.arange(32 // bits, dtype=np.uint32) * bits)) & ((1 << bits) - 1)
    q = q.reshape(*words.shape[:-1], -1).astype(np.float32)
    scale = np.repeat(np.array(s.astype(mx.float32)), group_size, axis=-1)
    bias = np.repeat(np.array(b.astype(mx.float32)), group_size, axis=-1)

    def to_t(a: np.ndarray) -> np.ndarray:  # float32 -> T (round to nearest even) -> float32
        return np.array(mx.array(a).astype(dtype).astype(mx.float32))

    product = q * scale  # exact in float32: q has at most 8 bits, the scale 11
    return {
        "T(T(q*s)+b)": to_t(to_t(product) + bias).astype(np.float64),
        "T(q*s+b)": to_t(product + bias).astype(np.float64),
        "q*s+b": (product + bias).astype(np.float64),
    }


def exact_sums(args, kw) -> dict[str, mx.array]:
    """Each output of the case as a float64 sum over each dequantization, rounded once to T."""
    x, w, s, b, lhs, rhs = args
    rows = np.array(x.astype(mx.float32))[:, 0, :].astype(np.float64)[np.array(lhs)]  # (L, K)
    out = {}
    for name, weights in dequantized(w, s, b, dtype=x.dtype, **kw).items():
        y = np.einsum("lnk,lk->ln", weights[np.array(rhs)], rows)
        out[name] = mx.array(y.astype(np.float32)).astype(x.dtype)
    return out


def run_case(case) -> dict:
    name, kind, dtype, batches, experts, n, k, bits, group = case
    args, kw = inputs(kind, dtype, batches, experts, n, k, bits, group)
    want = stock(kind, args, kw)
    got = qmm_rows.run_kernel("cuda", *args, init_value=float("nan"), **kw)
    mx.eval(want, got)
    diff = mx.abs(got.astype(mx.float32) - want.astype(mx.float32))
    differing = int((got != want).sum().item())
    against = {  # only where they differ: the float64 sums are slow
        name: {"stock": int((want != ref).sum().item()), "kernel": int((got != ref).sum().item())}
        for name, ref in (exact_sums(args, kw).items() if differing else ())
    }
    return {
        "case": name,
        "rows_x_batches": batches,
        "stock_kernel": "qmm_sm80" if batches >= STOCK_QMM_ROWS else "qmv",
        "bitwise": differing == 0,
        "differing": differing,
        "elements": int(want.size),
        "max_abs_diff": float(diff.max().item()),
        "differing_from_exact_sums": against,
    }


def main(out: Annotated[Path, typer.Option(help="where the JSON goes")] = OUT):
    if why := capsule.dir_problem(out, "--out"):
        print(f"error: {why}")
        raise typer.Exit(2)
    if backend.current() != "cuda":
        print(f"error: the probe runs CUDA kernels; this is MLX's {backend.current()} backend")
        raise typer.Exit(2)
    rows = []
    for case in CASES:
        r = run_case(case)
        rows.append(r)
        verdict = (
            "PASS"
            if r["bitwise"]
            else f"FAIL ({r['differing']}/{r['elements']}, max {r['max_abs_diff']:.3g})"
        )
        print(f"{r['case']:<36} stock {r['stock_kernel']:<8} {verdict}", flush=True)
        if not r["bitwise"]:
            sides = (
                f"{n}: stock {v['stock']}, kernel {v['kernel']}"
                for n, v in r["differing_from_exact_sums"].items()
            )
            print(f"    differing from the exact sums over {'; '.join(sides)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"qmm_order_probe-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    with path.open("x") as f:  # a new file: nothing there is overwritten
        json.dump(rows, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    typer.run(main)
