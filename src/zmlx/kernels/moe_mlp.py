"""moe_mlp: the routed experts' gate and up projections with SwiGLU inline (decode).

Stock (mlx-lm `SwitchGLU` with affine-quantized `QuantizedSwitchLinear`s):

    up   = gather_qmm(x, up_w, ..., rhs_indices=inds)     # (..., k, 1, I), rounded to T
    gate = gather_qmm(x, gate_w, ..., rhs_indices=inds)   # rounded to T
    h    = silu(gate) * up                                 # in T

gpt-oss's experts (`SwitchGLU(bias=True, activation=SwigluOAI())`): each projection adds its
expert's bias in T (`x + bias[inds]`, after the rounding), and the activation is mlx-lm's
compiled `swiglu_oai(gate, up, alpha, limit)`: `min(gate, limit)`, `clip(up, -limit, limit)`
(maximum, then minimum), `(up + 1) * (gate * sigmoid(alpha * gate))`, every op in T. The
kernel's compile-time variant (BIAS, OAI with the float32 bits of alpha and limit) does the
same after its dots.

Fused: one launch reads x once and each selected expert's gate and up rows once. One
32-lane warp (simdgroup) per output element (token, expert slot, row): the lanes split
the two rows, dequantize (scale * q + bias) and accumulate, a warp sum finishes each
dot, and lane 0 rounds gate and up to T and applies SwiGLU with stock's roundings.

Fidelity: on CUDA the dots are MLX's qmv's arithmetic and SwiGLU is MLX's own device
functors (csrc/quant.h), so the kernel is bitwise stock wherever stock runs qmv
(fewer than 8 expert rows, scales in x's dtype; other calls take the reference), for
affine, mxfp4 and unquantized experts. From 8 rows stock runs qmm_sm80 on affine weights of
its tile shapes; with quant.QMM_ORDER the kernel follows that order there (QMM: one warp
per 8 outputs, csrc/qmm_order.h and csrc/qmm_gate_up.h; PIPE, with quant.QMM_PIPELINED: the
same mma with the weights loaded a chunk ahead). On Metal the dot is a plain float32 sum:
`close`, held to a float32 reference with stock's own error as the bar.

Device code: BODY below (shared with swiglu_mlp: DOTS and its SwiGLU), MOE_BODY (DOTS, the
biases, SwiGLU or SwigluOAI; QMM's warps); the dot and SwiGLU are csrc/quant.h, SwigluOAI
csrc/swiglu_oai.h, qmm_sm80's order csrc/qmm_order.h and csrc/qmm_gate_up.h.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import mlx.core as mx

from zmlx.kernels import quant
from zmlx.kernels.core import KernelDef, Launch, Skip, device_code
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
    x,
    inds,
    gate_w,
    gate_s,
    gate_b,
    up_w,
    up_s,
    up_b,
    gate_pb=None,
    up_pb=None,
    *,
    group_size=None,
    bits=None,
    mode="affine",
    oai: tuple[float, float] | None = None,
):
    """mlx-lm's op sequence. x (..., D), inds (..., k) -> (..., k, I) in x's dtype.
    gate_pb, up_pb (E, I): the projections' own biases (gpt-oss), added as SwitchLinear adds
    them; `oai` (alpha, limit): SwigluOAI's activation instead of SwiGLU."""
    from mlx_lm.models.activations import swiglu, swiglu_oai

    xe = mx.expand_dims(x, (-2, -3))  # as SwitchGLU does: (..., 1, 1, D)
    up = gathered(xe, up_w, up_s, up_b, inds, group_size, bits, mode)
    if up_pb is not None:
        up = up + mx.expand_dims(up_pb[inds], -2)
    gate = gathered(xe, gate_w, gate_s, gate_b, inds, group_size, bits, mode)
    if gate_pb is not None:
        gate = gate + mx.expand_dims(gate_pb[inds], -2)
    if oai is not None:
        return swiglu_oai(gate, up, alpha=oai[0], limit=oai[1]).squeeze(-2)
    return swiglu(gate, up).squeeze(-2)


def reference_f32(
    x,
    inds,
    gate_w,
    gate_s,
    gate_b,
    up_w,
    up_s,
    up_b,
    gate_pb=None,
    up_pb=None,
    *,
    group_size=None,
    bits=None,
    mode="affine",
    oai: tuple[float, float] | None = None,
):
    """The same in float32 throughout (no rounding to T in between): the accuracy bar."""
    g_all = dequantized(gate_w, gate_s, gate_b, group_size, bits, mode)
    u_all = dequantized(up_w, up_s, up_b, group_size, bits, mode)
    xf = x.astype(mx.float32)[..., None, :, None]  # (..., 1, D, 1)
    g = (g_all[inds] @ xf)[..., 0]  # (..., k, I)
    u = (u_all[inds] @ xf)[..., 0]
    if gate_pb is not None:
        g = g + gate_pb[inds].astype(mx.float32)
    if up_pb is not None:
        u = u + up_pb[inds].astype(mx.float32)
    if oai is not None:
        alpha, limit = oai
        g, u = mx.minimum(g, limit), mx.clip(u, -limit, limit)
        return (u + 1.0) * (g * mx.sigmoid(alpha * g))
    return g * mx.sigmoid(g) * u


# Shared with swiglu_mlp (DENSE: one weight matrix, no indices, K = 1).
DOTS = """
// One warp per output element (n, slot, i): out[((n * K) + slot) * I + i].
const uint warp_id = zmlx_tid / 32;
const uint lane = zmlx_tid % 32;
if (warp_id >= N * K * I) return;  // whole warps only: the grid is a multiple of 32
const uint i = warp_id % I;
const uint slot = (warp_id / I) % K;
const uint n = warp_id / (I * K);
const size_t expert = DENSE ? 0 : size_t(inds[n * K + slot]);
const size_t row = expert * I + i;
constexpr uint WORDS = D / (32 / BITS);
constexpr uint GROUPS = D / GS;
float acc_g = zmlx_gqdot_lane<BITS, GS, D, FPQMV>(gate_w + row * WORDS, gate_s + row * GROUPS,
                                                 gate_b + row * GROUPS, x + size_t(n) * D, lane);
float acc_u = zmlx_gqdot_lane<BITS, GS, D, FPQMV>(up_w + row * WORDS, up_s + row * GROUPS,
                                                 up_b + row * GROUPS, x + size_t(n) * D, lane);
acc_g = ZMLX_SIMD_SUM(acc_g);
acc_u = ZMLX_SIMD_SUM(acc_u);
"""
BODY = (
    DOTS
    + """
if (lane == 0) {
    // stock rounds gate and up to T (qmv's output), then applies swiglu in T
    out[warp_id] = zmlx_swiglu(static_cast<T>(acc_g), static_cast<T>(acc_u));
}
"""
)
# moe_mlp's: BIAS adds the expert's gate and up biases (gate_pb, up_pb: placeholders without),
# OAI applies SwigluOAI with alpha and limit given as float32 bits. QMM (CUDA): the warps of
# csrc/qmm_gate_up.h instead, in qmm_sm80's order, 8 outputs a warp (PIPE: loaded ahead).
MOE_BODY = (
    """
#ifdef ZMLX_CUDA
if (QMM) {
    zmlx_qmm_gate_up_warp<QMM, PIPE, N, K, I, D, BITS, GS, BIAS, OAI>(zmlx_tid / 32, zmlx_tid % 32, x, inds,
        gate_w, gate_s, gate_b, up_w, up_s, up_b, gate_pb, up_pb, out,
        ZMLX_FLOAT_BITS(ALPHA), ZMLX_FLOAT_BITS(LIMIT));
    return;
}
#endif
"""
    + DOTS
    + """
if (lane == 0) {
    // stock rounds gate and up to T (qmv's output), adds the biases in T (SwitchLinear's
    // x + bias[inds]), then applies the activation in T
    T g = static_cast<T>(acc_g);
    T u = static_cast<T>(acc_u);
    if (BIAS) {
        g = zmlx_add(g, static_cast<T>(gate_pb[row]));
        u = zmlx_add(u, static_cast<T>(up_pb[row]));
    }
    const float alpha = ZMLX_FLOAT_BITS(ALPHA), limit = ZMLX_FLOAT_BITS(LIMIT);
    out[warp_id] = OAI ? zmlx_swiglu_oai(g, u, alpha, limit) : zmlx_swiglu(g, u);
}
"""
)

_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def gate_up_reason(x, gate: tuple, up: tuple, *, ndim: int, group_size, bits, mode="affine") -> str | None:
    """Why x and the gate and up (weight, scales, biases) do not fit the shared body (moe_mlp:
    stacked experts, ndim 3; swiglu_mlp: one matrix, ndim 2), or None."""
    if x.dtype not in _DTYPES:
        return f"x {x.dtype}"
    for w, s, b in (gate, up):
        why = weights_reason(
            w, s, b, cols=x.shape[-1], group_size=group_size, bits=bits, dtype=x.dtype, mode=mode
        )
        if why is not None:
            return why
    if gate[0].ndim != ndim or gate[0].shape != up[0].shape or (gate[1] is None) != (up[1] is None):
        return f"weights {gate[0].shape} / {up[0].shape}"
    return None


def _bits(v: float) -> int:
    """A float's float32 bits as the kernel's template takes them (a positive int)."""
    return struct.unpack("<i", struct.pack("<f", v))[0]


def oai_reason(x, gate_w, gate_pb, up_pb, oai) -> str | None:
    """Why the biases and SwigluOAI's parameters do not fit the kernel's variant, or None."""
    if (gate_pb is None) != (up_pb is None):
        return "a bias on one of gate_proj and up_proj only"
    for pb in (gate_pb, up_pb):
        if pb is not None and (pb.dtype != x.dtype or pb.shape != gate_w.shape[:2]):
            return f"projection bias {pb.shape} {pb.dtype} for x {x.dtype}, weights {gate_w.shape}"
    if oai is not None and not all(v > 0 and math.isfinite(v) for v in oai):
        return f"SwigluOAI alpha, limit {oai} (the kernel takes positive finite values)"
    return None


def launch(
    backend,
    x,
    inds,
    gate_w,
    gate_s,
    gate_b,
    up_w,
    up_s,
    up_b,
    gate_pb=None,
    up_pb=None,
    *,
    group_size=None,
    bits=None,
    mode="affine",
    oai: tuple[float, float] | None = None,
) -> Launch | Skip:
    gate, up = (gate_w, gate_s, gate_b), (up_w, up_s, up_b)
    if (why := gate_up_reason(x, gate, up, ndim=3, group_size=group_size, bits=bits, mode=mode)) is not None:
        return Skip(why)
    if (why := oai_reason(x, gate_w, gate_pb, up_pb, oai)) is not None:
        return Skip(why)
    d = x.shape[-1]
    if inds.shape[:-1] != x.shape[:-1] or inds.dtype != mx.uint32:
        return Skip(f"indices {inds.shape} {inds.dtype} for x {x.shape}")
    n = math.prod(x.shape[:-1])
    k = inds.shape[-1]
    i = gate_w.shape[1]
    qmm = all(
        qmm_order(
            backend, n * k, x.dtype, s, b, out_rows=i, cols=d, group_size=group_size, bits=bits, mode=mode
        )
        for s, b in ((gate_s, gate_b), (up_s, up_b))
    )
    for s, b, w in ((gate_s, gate_b, gate_w), (up_s, up_b, up_w)):
        if not qmm and (why := regime_reason(backend, n * k, x.dtype, s, b, w, mode=mode, gathered_cols=d)):
            return Skip(why)
    if n * k * i * 32 >= 2**31:
        return Skip(f"{n} tokens x {k} experts x {i} rows is too large for one launch")
    gs, nbits = packing(d, group_size, bits)
    return Launch(
        inputs=[
            x,
            inds,
            gate_w,
            or_placeholder(gate_s, gate_w),
            or_placeholder(gate_b, gate_w),
            up_w,
            or_placeholder(up_s, up_w),
            or_placeholder(up_b, up_w),
            or_placeholder(gate_pb, x),
            or_placeholder(up_pb, x),
        ],
        template=[
            ("T", x.dtype),
            ("N", n),
            ("K", k),
            ("I", i),
            ("D", d),
            ("GS", gs),
            ("BITS", nbits),
            ("DENSE", False),
            ("FPQMV", fp_order(backend, mode, d)),
            ("BIAS", gate_pb is not None),
            ("OAI", oai is not None),
            ("ALPHA", _bits(oai[0]) if oai else 0),
            ("LIMIT", _bits(oai[1]) if oai else 0),
            ("QMM", qmm),
            ("PIPE", qmm and quant.QMM_PIPELINED),
        ],
        grid=(n * k * (i // 8 if qmm else i) * 32, 1, 1),
        # QMM pipelined: 2 warps a block, so that its few warps (n * k * i / 8) spread over every SM
        threadgroup=(64 if qmm and quant.QMM_PIPELINED else 256, 1, 1),
        output_shapes=[x.shape[:-1] + (k, i)],
        output_dtypes=[x.dtype],
    )


def quantized_experts(experts: int, rows: int, d: int, *, group_size, bits, dtype, seed: int, mode="affine"):
    """Random expert weights (weight, scales, biases) as mlx-lm stores them: affine-quantized,
    mxfp4 (uint8 scales, no biases), or unquantized in `dtype` with no scales or biases when
    `bits` is None."""
    w = mx.random.normal((experts, rows, d), key=mx.random.key(seed)) * d**-0.5
    if bits is None:
        return w.astype(dtype), None, None
    if mode != "affine":
        q, s = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)[:2]  # no biases
        return q, s, None
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    return q, s.astype(dtype), b.astype(dtype)


def example():
    x = mx.random.normal((1, 1, 256), key=mx.random.key(41)).astype(mx.bfloat16)
    inds = mx.array([[[3, 0, 5, 1]]], dtype=mx.uint32)
    g = quantized_experts(6, 24, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=42)
    u = quantized_experts(6, 24, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=43)
    return (x, inds, *g, *u), dict(group_size=64, bits=4)


def qmm_example(backend: str = "cuda"):
    """A call of the QMM variant: 8 expert rows, outputs a multiple of 128; None where no call
    takes it (off CUDA, or quant.QMM_ORDER off): the self-check's variant_example."""
    if backend != "cuda" or not quant.QMM_ORDER:
        return None
    x = mx.random.normal((1, 1, 256), key=mx.random.key(44)).astype(mx.bfloat16)
    inds = mx.array([[[3, 0, 5, 1, 9, 2, 11, 7]]], dtype=mx.uint32)
    g = quantized_experts(12, 128, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=45)
    u = quantized_experts(12, 128, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=46)
    return (x, inds, *g, *u), dict(group_size=64, bits=4)


# What moe_mlp and swiglu_mlp share: the body, its header and its inputs, and fidelity.
SHARED: dict[str, Any] = dict(
    fidelity="close",
    exact_on=("cuda",),  # bitwise stock's qmv (+ swiglu) where launch() takes the call
    tolerance=2**-3,  # the self-check only: a few bf16 roundings, far below a layout error
    body=BODY,
    header=device_code("quant.h"),
    input_names=("x", "inds", "gate_w", "gate_s", "gate_b", "up_w", "up_s", "up_b"),
    output_names=("out",),
)

moe_mlp = KernelDef(
    name="moe_mlp",
    reference=reference,
    launch=launch,
    example=example,
    variant_example=qmm_example,
    **{
        **SHARED,
        "body": MOE_BODY,
        "header": device_code("quant.h", "swiglu_oai.h", "qmm_order.h", "qmm_gate_up.h"),
        "input_names": (*SHARED["input_names"], "gate_pb", "up_pb"),
    },
)
