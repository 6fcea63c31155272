"""moe_combine: weighted sum of the routed experts' outputs plus the shared expert.

One launch replaces mlx-lm's multiply, sum, cast and add. One thread per output
element; each sums its k float32 products in the order MLX's own reduction uses on
that backend, rounds to y's dtype, then adds the shared expert's output as mlx-lm
does (through float32, rounded once).

Summation order (read from MLX's CUDA col_reduce): a column of <= 32 rows whose
stride is a multiple of 16 bytes' worth of the summed dtype (4 floats, 8 bfloat16) is
summed in order by one thread (always the case for GLM-4.7-Flash: D = 2048); otherwise a
32-lane tree adds per-lane partial sums.
Metal sums in order here; its own reduction order is still to be checked on a Mac.

Device code: BODY below; stock's float32 sum of an output's k weighted expert rows is
csrc/expert_sum.h (`ZmlxExpertSum`: add(y, score) for k = 0, 1, ..., then total()), shared
with downproj_combine and moe_down.

Scores in float32 (a gate module's, GLM and DeepSeek) promote the products and the sum to
float32; scores in y's dtype (the softmax routers of Qwen3-MoE and Mixtral) keep them in it:
each product and each partial sum is rounded to that dtype, as MLX's reduction in it does.
"""

from __future__ import annotations

import math

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code


def reference(y: mx.array, scores: mx.array, shared: mx.array | None = None) -> mx.array:
    """y (..., k, D) expert outputs, scores (..., k) float32 or in y's dtype, shared (..., D)
    or None.

    mlx-lm's order and dtypes: the product and sum in the promoted dtype (float32 for
    float32 scores), the sum rounded back to y's dtype, then the shared expert added in it.
    """
    out = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
    if shared is not None:
        out = out + shared
    return out


BODY = """
if (zmlx_tid >= N) return;
const uint t = zmlx_tid / D;
const uint d = zmlx_tid % D;
ZmlxExpertSum<SEQUENTIAL, P, A> sum;
for (uint k = 0; k < K; ++k) {
    sum.add(static_cast<float>(y[(t * K + k) * D + d]), static_cast<float>(scores[t * K + k]));
}
const T r = static_cast<T>(sum.total());
out[zmlx_tid] = HAS_SHARED ? static_cast<T>(static_cast<float>(r) + static_cast<float>(shared[zmlx_tid])) : r;
"""


def sequential_sum(backend: str, k: int, d: int, itemsize: int = 4) -> bool:
    """Whether stock sums the k rows of a (k, d) block of `itemsize`-byte values in order
    (MLX's CUDA col_reduce_small: <= 32 rows, a stride of a multiple of 16 bytes' worth of
    values) or through its lane tree. Metal: in order (its own reduction order is still to
    be checked on a Mac)."""
    return backend != "cuda" or (d % (16 // itemsize) == 0 and k <= 32)


def sum_dtypes(backend: str, scores: mx.array, activations: mx.Dtype) -> tuple[mx.Dtype, mx.Dtype] | None:
    """(the products' dtype, the sum's) as stock weights and sums the expert rows on
    `backend`: float32 and float32 for float32 scores; for scores in the activations' dtype
    T, products in T, summed in T by MLX's CUDA column reduce (its accumulator is the input
    type) and in float32 elsewhere (MLX's CPU backend; Metal's own is still to be checked on
    a Mac). None for any other scores."""
    if scores.dtype == mx.float32:
        return mx.float32, mx.float32
    if scores.dtype != activations:
        return None
    return activations, activations if backend == "cuda" else mx.float32


_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def launch(backend, y, scores, shared=None) -> Launch | Skip:
    if y.ndim < 2 or y.dtype not in _DTYPES:
        return Skip(f"y {y.dtype} of rank {y.ndim}")
    dtypes = sum_dtypes(backend, scores, y.dtype)
    if dtypes is None or scores.shape != y.shape[:-1]:
        return Skip(f"scores {scores.shape} {scores.dtype}: not float32 or y's dtype, of y's leading shape")
    if shared is not None and (shared.dtype != y.dtype or shared.shape != y.shape[:-2] + y.shape[-1:]):
        return Skip("shared expert output does not match y")
    k, d = y.shape[-2:]
    n = math.prod(y.shape[:-2]) * d
    if n == 0 or n >= 2**31:
        return Skip(f"{n} outputs")
    sequential = sequential_sum(backend, k, d, dtypes[0].size)
    return Launch(
        inputs=[y, scores, shared if shared is not None else y],
        template=[
            ("T", y.dtype),
            ("P", dtypes[0]),
            ("A", dtypes[1]),
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
