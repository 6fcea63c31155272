"""Where a custom kernel call's host time goes (CUDA only): in-graph µs per call of a stock
op, of the decode attention's cuBLAS matmuls, of a minimal custom kernel (short and ~8 KB
source), and of residual_norm through KernelDef vs called directly with its launch spec
computed once. A diagnostic for the decode step's host overhead (benchmarks/bench_kernels.py
--overhead); `zmlx report` prints its rows."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import mlx.core as mx

from zmlx import backend
from zmlx.kernels.residual_norm import residual_norm


def overhead(iters: int = 200, repeats: int = 7) -> list[dict[str, Any]]:
    """Where a custom kernel call's host time goes (CUDA only): in-graph µs per call of a
    stock op, a minimal custom kernel (short and ~8 KB source), and residual_norm through
    KernelDef vs called directly with its launch spec computed once."""
    if backend.current() != "cuda":
        return []
    from zmlx.kernels.core import Launch, build

    x = mx.random.normal((1, 1, 2048)).astype(mx.bfloat16)
    r = mx.random.normal((1, 1, 2048)).astype(mx.bfloat16)
    w = mx.ones((2048,), mx.bfloat16)
    mx.eval(x, r, w)

    def minimal(pad: int) -> Callable[[], Any]:
        k: Any = mx.fast.cuda_kernel(
            name=f"zmlx_overhead_copy_{pad}",
            input_names=["x"],
            output_names=["out"],
            header="// " + "pad " * pad + "\n",
            source="const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < N) out[i] = x[i];",
        )
        return lambda: k(
            inputs=[x],
            template=[("N", x.size)],
            grid=(x.size, 1, 1),
            threadgroup=(256, 1, 1),
            output_shapes=[x.shape],
            output_dtypes=[x.dtype],
        )[0]

    assert residual_norm.launch is not None
    spec = residual_norm.launch("cuda", x, r, w, 1e-5)
    if not isinstance(spec, Launch):  # the study's shapes always fit; say so if they stop fitting
        raise ValueError(f"residual_norm does not launch on the study's shapes: {spec.reason}")
    kernel = build(residual_norm, "cuda")

    def direct():
        return kernel(
            inputs=spec.inputs,
            template=spec.template,
            grid=spec.grid,
            threadgroup=spec.threadgroup,
            output_shapes=spec.output_shapes,
            output_dtypes=spec.output_dtypes,
        )

    # GLM-4.7-Flash's decode attention at 4096 positions as MLX's fallback runs it (the default
    # preset's three such matmuls a layer: cuBLASLt, whose descriptors, heuristic and stream
    # capture MLX makes at each call)
    q = mx.random.normal((1, 20, 1, 512)).astype(mx.bfloat16)
    kv = mx.random.normal((1, 1, 4096, 512)).astype(mx.bfloat16)
    p = mx.softmax(mx.random.normal((1, 20, 1, 4096)), axis=-1).astype(mx.bfloat16)
    mx.eval(q, kv, p)
    cases: dict[str, Callable[[], Any]] = {
        "stock op (x + r)": lambda: x + r,
        "stock rms_norm": lambda: mx.fast.rms_norm(x, w, 1e-5),
        "stock matmul, decode scores (cuBLAS)": lambda: q @ kv.swapaxes(-1, -2),
        "stock matmul, decode values (cuBLAS)": lambda: p @ kv,
        "custom copy, short source": minimal(0),
        "custom copy, ~8 KB source": minimal(2000),
        "residual_norm, launch spec precomputed": direct,
        "residual_norm through KernelDef": lambda: residual_norm(x, r, w, 1e-5),
    }
    rows: list[dict[str, Any]] = []
    for name, fn in cases.items():
        try:
            mx.eval(fn())
        except Exception as e:  # one broken case must not lose the others
            rows.append({"case": name, "error": str(e).splitlines()[0]})
            continue
        split = [_split_us(fn, iters) for _ in range(repeats)]
        rows.append(
            {
                "case": name,
                "graph_us": statistics.median(b + e for b, e in split),
                "build_us": statistics.median(b for b, _ in split),
                "eval_us": statistics.median(e for _, e in split),
                "graph_us_blocks": [b + e for b, e in split],
            }
        )
    return rows


def _split_us(fn: Callable[[], Any], iters: int) -> tuple[float, float]:
    """In-graph µs per call, split into building the graph (Python + MLX's op
    construction) and evaluating it (encoding, launch, GPU)."""
    t0 = time.perf_counter()
    outs = [fn() for _ in range(iters)]
    t1 = time.perf_counter()
    mx.eval(outs)
    t2 = time.perf_counter()
    return (t1 - t0) / iters * 1e6, (t2 - t1) / iters * 1e6
