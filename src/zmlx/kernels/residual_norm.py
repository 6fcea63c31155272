"""residual_norm: the decoder's residual add and the RMSNorm that follows it, in one launch.

    h = x + r                                  (in x's dtype, as mlx-lm adds)
    n = mx.fast.rms_norm(h, w, eps)

Both outputs are returned: h carries the residual stream, n feeds the next block.
One threadgroup per row. The kernel is bitwise MLX's own `rms_norm` because it
follows that kernel's arithmetic, read from MLX's sources:
- the sum of squares: each thread accumulates its elements in float32, chunk by
  chunk (`(BLOCK * i + thread) * NR + j`), then a warp (simdgroup) reduce, the warps'
  sums into threadgroup memory (zeros beyond the last warp) and a second warp reduce
  with the same primitive MLX uses (`cg::reduce` on CUDA, `simd_sum` on Metal);
- CUDA accumulates with fused multiply-adds (nvcc contracts MLX's `acc += t * t`);
  Metal writes the same expression as MLX's Metal kernel;
- `rsqrt(sum / D + eps)`, then `w * T(float(h) * inv)` with the product in T;
- the geometry MLX picks for the row length: on CUDA NR = 16 bytes of T per read and
  (BLOCK, CHUNKS) from its `dispatch_num_chunks` (or 1024 threads past 1024 reads);
  on Metal NR = 4, one chunk, up to 4096 values (longer rows take the reference).

Device code: csrc/residual_norm.h (the per-backend square-accumulate and rsqrt) and
csrc/residual_norm_body.h (the body); the geometry is `geometry()` below.
"""

from __future__ import annotations

import math

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code, float_bits


def reference(x: mx.array, r: mx.array, w: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """x, r (..., D) of one dtype, w (D,) -> (h = x + r, rms_norm(h) * w)."""
    h = x + r
    return h, mx.fast.rms_norm(h, w, eps)


_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def geometry(backend: str, d: int, itemsize: int) -> tuple[int, int, int] | Skip:
    """(BLOCK threads, CHUNKS, NR values per read) as MLX's rms_norm lays out a row of d."""
    if backend == "metal":
        if d > 4096:
            return Skip(f"row of {d} (MLX's Metal rms_norm loops past 4096; its order is not followed)")
        nr = 4
        return 32 * math.ceil(math.ceil(d / nr) / 32), 1, nr
    nr = 16 // itemsize
    nvec = math.ceil(d / nr)
    if d > nr * 128 * 8:
        return 1024, math.ceil(nvec / 1024), nr
    if d <= nr * 64:
        return 64, 1, nr
    if nvec % 128 == 0 and nvec // 128 <= 8:
        return 128, nvec // 128, nr
    if nvec % 64 == 0 and nvec // 64 <= 8:
        return 64, nvec // 64, nr
    return 128, math.ceil(nvec / 128), nr


def launch(backend, x, r, w, eps) -> Launch | Skip:
    if x.dtype not in _DTYPES or r.dtype != x.dtype or w.dtype != x.dtype:
        return Skip(f"x {x.dtype}, r {r.dtype}, w {w.dtype} (one float dtype needed)")
    if x.ndim < 1 or r.shape != x.shape or w.shape != x.shape[-1:]:
        return Skip(f"shapes x {x.shape}, r {r.shape}, w {w.shape}")
    d = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    if d == 0 or rows == 0:
        return Skip("empty input")
    geo = geometry(backend, d, x.dtype.size)
    if isinstance(geo, Skip):
        return geo
    block, chunks, nr = geo
    if chunks * nr > 64:
        return Skip(f"row of {d} needs {chunks * nr} values per thread")
    return Launch(
        inputs=[x, r, w],
        template=[
            ("T", x.dtype),
            ("D", d),
            ("BLOCK", block),
            ("CHUNKS", chunks),
            ("NR", nr),
            ("EPS_BITS", float_bits(eps)),
        ],
        grid=(rows * block, 1, 1),
        threadgroup=(block, 1, 1),
        output_shapes=[x.shape, x.shape],
        output_dtypes=[x.dtype, x.dtype],
    )


def example():
    x = mx.random.normal((3, 2048), key=mx.random.key(31)).astype(mx.bfloat16)
    r = mx.random.normal((3, 2048), key=mx.random.key(32)).astype(mx.bfloat16)
    w = (1 + 0.1 * mx.random.normal((2048,), key=mx.random.key(33))).astype(mx.bfloat16)
    return (x, r, w, 1e-5), {}


residual_norm = KernelDef(
    name="residual_norm",
    reference=reference,
    body=device_code("residual_norm_body.h"),
    header=device_code("residual_norm.h"),
    input_names=("x", "r", "w"),
    output_names=("h", "out"),
    launch=launch,
    example=example,
)
