"""downproj_combine: the routed experts' down projection, the routing weights and the
shared expert's output, accumulated in one launch (decode).

Stock (mlx-lm `SwitchGLU.down_proj` then `Glm4MoeLiteMoE`'s combine):

    y   = gather_qmm(h, down_w, ..., rhs_indices=inds)      # (..., k, D), rounded to T
    out = (y * scores[..., None]).sum(-2).astype(T) + shared

Fused: one warp per output value (token, d). For each of the k experts in order the
lanes dot the expert's packed row d with h_k and warp-sum it; the result is rounded to T
as stock rounds y, weighted and summed in moe_combine's order and dtypes (float32 for a
gate module's float32 scores, T for a softmax router's scores in T), rounded to T,
and the shared expert's output added as stock adds it. No (k, D) intermediate is
written: memory stays at the output's size however many experts or tokens.

Fidelity: on CUDA the dot is MLX's qmv's arithmetic (csrc/quant.h), so the kernel
is bitwise stock wherever stock runs qmv (fewer than 8 expert rows; affine, mxfp4 or
unquantized experts); from 8 rows stock runs qmm_sm80 on affine weights of its tile shapes,
and with quant.QMM_ORDER the kernel follows that order there (QMM: a block of k warps per 8
outputs, one warp an expert, the weighted sum in moe_combine's order after a barrier).
On Metal the dot is a plain float32 sum (`close`).

Device code: BODY below; the dot is csrc/quant.h, the sum in stock's order csrc/expert_sum.h,
qmm_sm80's order csrc/qmm_order.h and csrc/qmm_down.h.
"""

from __future__ import annotations

import math

import mlx.core as mx

from zmlx.kernels import quant
from zmlx.kernels.core import KernelDef, Launch, Skip, device_code
from zmlx.kernels.moe_combine import reference as combine
from zmlx.kernels.moe_combine import sequential_sum, sum_dtypes
from zmlx.kernels.quant import (
    dequantized,
    fp_order,
    gathered,
    or_placeholder,
    packing,
    qmm_order,
    regime_reason,
    weights_reason,
)


def reference(
    h,
    inds,
    scores,
    down_w,
    down_s,
    down_b,
    shared=None,
    *,
    group_size=None,
    bits=None,
    mode="affine",
    bias=None,
):
    """mlx-lm's op sequence. h (..., k, I) in T, inds (..., k), scores (..., k) float32 or T,
    shared (..., D) or None -> (..., D) in T. bias (E, D) or None: the experts' biases, added
    to each row in T as mlx-lm's SwitchLinear adds them (gpt-oss's)."""
    y = gathered(mx.expand_dims(h, -2), down_w, down_s, down_b, inds, group_size, bits, mode)
    if bias is not None:
        y = y + mx.expand_dims(bias[inds], -2)
    return combine(y.squeeze(-2), scores, shared)


def reference_f32(
    h,
    inds,
    scores,
    down_w,
    down_s,
    down_b,
    shared=None,
    *,
    group_size=None,
    bits=None,
    mode="affine",
    bias=None,
):
    """The same in float32 throughout: the accuracy bar."""
    w = dequantized(down_w, down_s, down_b, group_size, bits, mode)
    y = (w[inds] @ h.astype(mx.float32)[..., None])[..., 0]  # (..., k, D)
    if bias is not None:
        y = y + bias[inds].astype(mx.float32)
    out = (y * scores[..., None]).sum(axis=-2)
    return out if shared is None else out + shared.astype(mx.float32)


BODY = """
#ifdef ZMLX_CUDA
if (QMM) {  // qmm_sm80's order: one block of K warps per 8 outputs, a warp an expert (csrc/qmm_down.h)
    zmlx_qmm_down_block<QMM, N, K, I, D, BITS, GS, SEQUENTIAL, P, A, HAS_SHARED>(
        zmlx_gid, zmlx_warp, zmlx_lane, h, inds, scores, down_w, down_s, down_b, shared, out);
    return;
}
#endif
// One warp per output value (n, d).
const uint warp_id = zmlx_tid / 32;
const uint lane = zmlx_tid % 32;
if (warp_id >= N * D) return;  // whole warps only: the grid is a multiple of 32
const uint d = warp_id % D;
const uint n = warp_id / D;
constexpr uint WORDS = I / (32 / BITS);
constexpr uint GROUPS = I / GS;
ZmlxExpertSum<SEQUENTIAL, P, A> sum;
for (uint k = 0; k < K; ++k) {
    const size_t row = size_t(inds[n * K + k]) * D + d;
    float acc = zmlx_gqdot_lane<BITS, GS, I, FPQMV>(down_w + row * WORDS, down_s + row * GROUPS,
                                            down_b + row * GROUPS, h + (size_t(n) * K + k) * I, lane);
    acc = ZMLX_SIMD_SUM(acc);  // every lane holds the row's sum
    // stock rounds each expert's output to T, then weights (in P) and sums (in A) in moe_combine's order
    sum.add(static_cast<float>(static_cast<T>(acc)), static_cast<float>(scores[n * K + k]));
}
if (lane == 0) {
    const T r = static_cast<T>(sum.total());
    out[warp_id] = HAS_SHARED
        ? static_cast<T>(static_cast<float>(r) + static_cast<float>(shared[warp_id])) : r;
}
"""

_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def launch(
    backend,
    h,
    inds,
    scores,
    down_w,
    down_s,
    down_b,
    shared=None,
    *,
    group_size=None,
    bits=None,
    mode="affine",
    qmm_down: bool | None = None,
) -> Launch | Skip:
    """qmm_down: whether qmm_sm80's rows take the QMM variant (None: quant.QMM_DOWN; moe_down
    asks for it with its own switch, quant.QMM_BLOCK)."""
    if h.dtype not in _DTYPES or h.ndim < 2:
        return Skip(f"h {h.dtype} of rank {h.ndim}")
    k, i = h.shape[-2:]
    lead = h.shape[:-2]
    why = weights_reason(
        down_w, down_s, down_b, cols=i, group_size=group_size, bits=bits, dtype=h.dtype, mode=mode
    )
    if why is not None:
        return Skip(why)
    if down_w.ndim != 3:
        return Skip(f"weights {down_w.shape}")
    d = down_w.shape[1]
    if inds.shape != lead + (k,) or inds.dtype != mx.uint32:
        return Skip(f"indices {inds.shape} {inds.dtype} for h {h.shape}")
    dtypes = sum_dtypes(backend, scores, h.dtype)
    if scores.shape != lead + (k,) or dtypes is None:
        return Skip(f"scores {scores.shape} {scores.dtype}: not float32 or h's dtype, of h's leading shape")
    if shared is not None and (shared.shape != lead + (d,) or shared.dtype != h.dtype):
        return Skip("shared expert output does not match")
    n = math.prod(lead)
    qmm = qmm_order(
        backend,
        n * k,
        h.dtype,
        down_s,
        down_b,
        out_rows=d,
        cols=i,
        group_size=group_size,
        bits=bits,
        mode=mode,
    )
    if qmm and not (quant.QMM_DOWN if qmm_down is None else qmm_down):
        return Skip(f"{n * k} expert rows: stock's qmm_sm80, whose order's variant is off (quant.QMM_DOWN)")
    if not qmm and (
        why := regime_reason(backend, n * k, h.dtype, down_s, down_b, down_w, mode=mode, gathered_cols=i)
    ):
        return Skip(why)
    if qmm and k > 32:  # a block of k warps
        return Skip(f"{k} experts a token: more warps than a block holds (QMM: one an expert)")
    if n * d * 32 >= 2**31:
        return Skip(f"{n} tokens x {d} outputs is too large for one launch")
    gs, nbits = packing(i, group_size, bits)
    return Launch(
        inputs=[
            h,
            inds,
            scores,
            down_w,
            or_placeholder(down_s, down_w),
            or_placeholder(down_b, down_w),
            or_placeholder(shared, h),
        ],
        template=[
            ("T", h.dtype),
            ("P", dtypes[0]),
            ("A", dtypes[1]),
            ("N", n),
            ("K", k),
            ("I", i),
            ("D", d),
            ("GS", gs),
            ("BITS", nbits),
            ("HAS_SHARED", shared is not None),
            ("SEQUENTIAL", sequential_sum(backend, k, d, dtypes[0].size)),
            ("FPQMV", fp_order(backend, mode, i)),
            ("QMM", qmm),
        ],
        # QMM: a block of k warps (one an expert) for each 8 outputs; else a warp an output
        grid=(n * (d // 8) * 32 * k if qmm else n * d * 32, 1, 1),
        threadgroup=(32 * k if qmm else 256, 1, 1),
        output_shapes=[lead + (d,)],
        output_dtypes=[h.dtype],
    )


def example():
    from zmlx.kernels.moe_mlp import quantized_experts

    h = mx.random.normal((1, 1, 4, 128), key=mx.random.key(51)).astype(mx.bfloat16)
    inds = mx.array([[[3, 0, 5, 1]]], dtype=mx.uint32)
    scores = mx.random.uniform(shape=(1, 1, 4), key=mx.random.key(52))
    w = quantized_experts(6, 40, 128, group_size=64, bits=4, dtype=mx.bfloat16, seed=53)
    shared = mx.random.normal((1, 1, 40), key=mx.random.key(54)).astype(mx.bfloat16)
    return (h, inds, scores, *w, shared), dict(group_size=64, bits=4)


def qmm_example(backend: str = "cuda"):
    """A call of the QMM variant: 8 expert rows, outputs a multiple of 128; None where no call
    takes it (off CUDA, or quant.QMM_ORDER or QMM_DOWN off): the self-check's variant_example."""
    if backend != "cuda" or not (quant.QMM_ORDER and quant.QMM_DOWN):
        return None
    from zmlx.kernels.moe_mlp import quantized_experts

    h = mx.random.normal((1, 1, 8, 256), key=mx.random.key(55)).astype(mx.bfloat16)
    inds = mx.array([[[3, 0, 5, 1, 9, 2, 11, 7]]], dtype=mx.uint32)
    scores = mx.random.uniform(shape=(1, 1, 8), key=mx.random.key(56))
    w = quantized_experts(12, 128, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=57)
    shared = mx.random.normal((1, 1, 128), key=mx.random.key(58)).astype(mx.bfloat16)
    return (h, inds, scores, *w, shared), dict(group_size=64, bits=4)


downproj_combine = KernelDef(
    name="downproj_combine",
    reference=reference,
    fidelity="close",
    exact_on=("cuda",),  # bitwise stock's qmv (+ swiglu) where launch() takes the call
    tolerance=2**-3,  # the self-check only: a few bf16 roundings, far below a layout error
    body=BODY,
    header=device_code("quant.h", "expert_sum.h", "qmm_order.h", "qmm_down.h"),
    input_names=("h", "inds", "scores", "down_w", "down_s", "down_b", "shared"),
    output_names=("out",),
    launch=launch,
    example=example,
    variant_example=qmm_example,
)
