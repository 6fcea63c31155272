"""moe_combine: weighted sum of the routed experts' outputs plus the shared expert.

One launch replaces mlx-lm's multiply, sum, cast and add. One thread per output
element; each sums its k float32 products in the order MLX's own reduction uses on
that backend, rounds to y's dtype, then adds the shared expert's output as mlx-lm
does (through float32, rounded once).

Summation order (read from MLX's CUDA col_reduce): a column of <= 32 rows whose
stride is a multiple of 4 floats is summed in order by one thread (always the case
for GLM-4.7-Flash: D = 2048); otherwise a 32-lane tree adds per-lane partial sums.
Metal sums in order here; its own reduction order is still to be checked on a Mac.

Device code: BODY below; stock's float32 sum of an output's k weighted expert rows is
csrc/expert_sum.h (`ZmlxExpertSum`: add(term) for k = 0, 1, ..., then total()), shared
with downproj_combine.
"""

from __future__ import annotations

import math

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code


def reference(y: mx.array, scores: mx.array, shared: mx.array | None = None) -> mx.array:
    """y (..., k, D) expert outputs, scores (..., k) float32, shared (..., D) or None.

    mlx-lm's order and dtypes: the product and sum promote to float32, the sum is
    rounded back to y's dtype, then the shared expert is added in that dtype.
    """
    out = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
    if shared is not None:
        out = out + shared
    return out


BODY = """
if (zmlx_tid >= N) return;
const uint t = zmlx_tid / D;
const uint d = zmlx_tid % D;
ZmlxExpertSum<SEQUENTIAL> sum;
for (uint k = 0; k < K; ++k) {
    sum.add(ZMLX_MUL(static_cast<float>(y[(t * K + k) * D + d]), scores[t * K + k]));
}
const T r = static_cast<T>(sum.total());
out[zmlx_tid] = HAS_SHARED ? static_cast<T>(static_cast<float>(r) + static_cast<float>(shared[zmlx_tid])) : r;
"""


def sequential_sum(backend: str, k: int, d: int) -> bool:
    """Whether stock sums the k rows of a (k, d) block in order (MLX's CUDA col_reduce_small:
    <= 32 rows, a stride of a multiple of 4 floats) or through its lane tree. Metal: in order
    (its own reduction order is still to be checked on a Mac)."""
    return backend != "cuda" or (d % 4 == 0 and k <= 32)


_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def launch(backend, y, scores, shared=None) -> Launch | Skip:
    if y.ndim < 2 or y.dtype not in _DTYPES:
        return Skip(f"y {y.dtype} of rank {y.ndim}")
    if scores.dtype != mx.float32 or scores.shape != y.shape[:-1]:
        return Skip("scores are not float32 of y's leading shape")
    if shared is not None and (shared.dtype != y.dtype or shared.shape != y.shape[:-2] + y.shape[-1:]):
        return Skip("shared expert output does not match y")
    k, d = y.shape[-2:]
    n = math.prod(y.shape[:-2]) * d
    if n == 0 or n >= 2**31:
        return Skip(f"{n} outputs")
    sequential = sequential_sum(backend, k, d)
    return Launch(
        inputs=[y, scores, shared if shared is not None else y],
        template=[
            ("T", y.dtype),
            ("K", k),
            ("D", d),
            ("N", n),
            ("HAS_SHARED", shared is not None),
            ("SEQUENTIAL", sequential),
        ],
        grid=(n, 1, 1),
        threadgroup=(min(256, n), 1, 1),
        output_shapes=[y.shape[:-2] + (d,)],
        output_dtypes=[y.dtype],
    )


def example():
    y = mx.random.normal((2, 4, 96), key=mx.random.key(11)).astype(mx.bfloat16)
    scores = mx.random.uniform(shape=(2, 4), key=mx.random.key(12))
    shared = mx.random.normal((2, 96), key=mx.random.key(13)).astype(mx.bfloat16)
    return (y, scores, shared), {}


moe_combine = KernelDef(
    name="moe_combine",
    reference=reference,
    body=BODY,
    header=device_code("expert_sum.h"),
    input_names=("y", "scores", "shared"),
    output_names=("out",),
    launch=launch,
    example=example,
)
