"""qmm_rows: quantized rows x experts (or heads) in the order of MLX's qmm_sm80 (a probe, CUDA).

On CUDA stock's quantized matmul leaves its qmv for qmm_sm80 once rows x batches reach 8:
gather_qmm over 8 experts at decode (top-8 families) and MultiLinear's batched matmul over
GLM-4.7-Flash's heads (embed_q, unembed_out). This kernel computes out[l] = x[lhs[l]] @
dequantize(w[rhs[l]])^T for L (row, expert) pairs, each output as qmm_sm80 computes it as read
from MLX's source (csrc/qmm_order.h: weights dequantized in T, mma.sync over k-blocks of 16 in
order, one rounding), one warp for 8 outputs of a pair. Whether that is bitwise stock is what
benchmarks/gpu/qmm_order_probe.py asks on a GPU; no pattern uses the kernel yet.

`reference` is stock's op (mx.gather_qmm); elsewhere than CUDA the launch steps aside.
Device code: csrc/qmm_order.h (the order); the short body below.
"""

from __future__ import annotations

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code

# MLX 0.32's dispatch: qmm_sm80 where rows x batches >= 8 (and N % 128 == 0, K % 64 == 0)
STOCK_QMM_ROWS = 8

_BODY = """
const uint zmlx_w = zmlx_tid / 32;  // one warp: 8 outputs of one (row, expert) pair
constexpr uint NT = N / 8;
if (zmlx_w < L * NT) {
    constexpr uint UV = 32 / BITS;
    const uint l = zmlx_w / NT;
    const uint n0 = 8 * (zmlx_w % NT);
    const size_t e = rhs[l];
    float c[4];
    zmlx_qmm_row8<BITS, GS, K>(x + size_t(lhs[l]) * K, w + e * N * (K / UV), s + e * N * (K / GS),
                              b + e * N * (K / GS), n0, zmlx_lane, c);
    if (zmlx_lane < 4) {
        out[size_t(l) * N + n0 + 2 * zmlx_lane] = static_cast<T>(c[0]);
        out[size_t(l) * N + n0 + 2 * zmlx_lane + 1] = static_cast<T>(c[1]);
    }
}
"""


def reference(x, w, s, b, lhs, rhs, *, group_size, bits):
    """Stock: x (A, 1, K) rows, w/s/b (E, N, ...) packed experts, lhs/rhs (L,) -> (L, N)."""
    out = mx.gather_qmm(
        x, w, s, b, lhs_indices=lhs, rhs_indices=rhs, transpose=True, group_size=group_size, bits=bits
    )
    return out.reshape(lhs.size, -1)


def launch(backend, x, w, s, b, lhs, rhs, *, group_size, bits) -> Launch | Skip:
    if backend != "cuda":
        return Skip("qmm_rows is CUDA's mma.sync")
    _, _, k = x.shape
    _, n, _ = w.shape
    if n % 8 or k % 16 or x.dtype not in (mx.bfloat16, mx.float16):
        return Skip(f"N {n} (x8), K {k} (x16), {x.dtype} (bf16 or half)")
    if bits not in (4, 8) or group_size not in (32, 64, 128) or k % group_size:
        return Skip(f"{bits}-bit, group {group_size}, K {k}: affine 4 or 8 bits, groups of 32/64/128")
    if w.dtype != mx.uint32 or s.dtype != x.dtype or b.dtype != x.dtype or w.shape[-1] != k * bits // 32:
        return Skip(f"w {w.dtype} {w.shape}, scales {s.dtype}: MLX's affine packing of {x.dtype} rows")
    batches = lhs.size
    return Launch(
        inputs=[x, w, s, b, lhs, rhs],
        template=[("T", x.dtype), ("BITS", bits), ("GS", group_size), ("K", k), ("N", n), ("L", batches)],
        grid=(batches * (n // 8) * 32, 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(batches, n)],
        output_dtypes=[x.dtype],
    )


qmm_rows = KernelDef(
    name="qmm_rows",
    reference=reference,
    body=_BODY,
    header=device_code("qmm_order.h"),
    input_names=("x", "w", "s", "b", "lhs", "rhs"),
    output_names=("out",),
    launch=launch,
)
