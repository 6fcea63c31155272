"""swiglu_mlp: a dense MLP's gate and up projections with SwiGLU inline (decode).

Stock (mlx-lm's dense MLP with affine-quantized `QuantizedLinear`s, e.g. GLM-4.7-Flash's
shared expert and its first, dense layer):

    gate = quantized_matmul(x, gate_w, ...)   # (..., I), rounded to T
    up   = quantized_matmul(x, up_w, ...)
    h    = swiglu(gate, up)                   # in T; down_proj(h) stays mlx-lm's

Fused: moe_mlp's kernel body with one weight matrix and no indices (`DENSE`): one warp
per output element reads x once and the row of each projection once, lane 0 applies
SwiGLU. Three launches become one.

Fidelity: on CUDA the dots follow MLX's qmv and SwiGLU is MLX's own device functors,
so the kernel is bitwise stock wherever stock runs qmv: for a dense matmul on sm90 (Hopper)
that is one row (one token; from two rows stock takes its sm90 tiled qmm), and the
kernel takes only such calls. mxfp4 weights have no sm90 qmm: they stay in qmv below 8
rows (on sm100 and later stock's fp_qmv takes them: not bitwise there). On Metal the dot
is a plain float32 sum (`close`).

Device code: moe_mlp's BODY (src/zmlx/kernels/moe_mlp.py) with csrc/quant.h.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip
from zmlx.kernels.moe_mlp import SHARED, gate_up_reason, quantized_experts
from zmlx.kernels.quant import dequantized, or_placeholder, packing, regime_reason


def dense(x, w, s, b, group_size, bits, mode="affine"):
    """mlx's (Quantized)Linear without bias: quantized_matmul, or x @ w.T unquantized (s None)."""
    if s is None:
        return x @ w.T
    return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group_size, bits=bits, mode=mode)


def reference(x, gate_w, gate_s, gate_b, up_w, up_s, up_b, *, group_size=None, bits=None, mode="affine"):
    """mlx-lm's op sequence. x (..., D), weights (I, D) or packed -> (..., I) in x's dtype."""
    from mlx_lm.models.activations import swiglu

    gate = dense(x, gate_w, gate_s, gate_b, group_size, bits, mode)
    return swiglu(gate, dense(x, up_w, up_s, up_b, group_size, bits, mode))


def reference_f32(x, gate_w, gate_s, gate_b, up_w, up_s, up_b, *, group_size=None, bits=None, mode="affine"):
    """The same in float32 throughout (no rounding to T in between): the accuracy bar."""
    xf = x.astype(mx.float32)
    g = xf @ dequantized(gate_w, gate_s, gate_b, group_size, bits, mode).T
    u = xf @ dequantized(up_w, up_s, up_b, group_size, bits, mode).T
    return g * mx.sigmoid(g) * u


@functools.cache
def _no_indices() -> mx.array:
    # the shared body's index input, never read when DENSE
    return mx.zeros((1,), mx.uint32)


def launch(
    backend, x, gate_w, gate_s, gate_b, up_w, up_s, up_b, *, group_size=None, bits=None, mode="affine"
) -> Launch | Skip:
    gate, up = (gate_w, gate_s, gate_b), (up_w, up_s, up_b)
    if (why := gate_up_reason(x, gate, up, ndim=2, group_size=group_size, bits=bits, mode=mode)) is not None:
        return Skip(why)
    d = x.shape[-1]
    i = gate_w.shape[0]
    n = math.prod(x.shape[:-1])
    if n == 0:
        return Skip("no tokens")
    # a dense matmul leaves its matvec (qmv or gemv) from 2 rows (mxfp4: from 8)
    for s, b, w in ((gate_s, gate_b, gate_w), (up_s, up_b, up_w)):
        if (
            why := regime_reason(backend, n, x.dtype, s, b, w, qmv_rows=2, gemv_rows=2, mode=mode)
        ) is not None:
            return Skip(why)
    if n * i * 32 >= 2**31:
        return Skip(f"{n} tokens x {i} rows is too large for one launch")
    gs, nbits = packing(d, group_size, bits)
    return Launch(
        inputs=[
            x,
            _no_indices(),
            gate_w,
            or_placeholder(gate_s, gate_w),
            or_placeholder(gate_b, gate_w),
            up_w,
            or_placeholder(up_s, up_w),
            or_placeholder(up_b, up_w),
        ],
        template=[
            ("T", x.dtype),
            ("N", n),
            ("K", 1),
            ("I", i),
            ("D", d),
            ("GS", gs),
            ("BITS", nbits),
            ("DENSE", True),
            ("FPQMV", False),  # its rows are not gathered
        ],
        grid=(n * i * 32, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape[:-1] + (i,)],
        output_dtypes=[x.dtype],
    )


def quantized_linear(rows: int, d: int, *, group_size, bits, dtype, seed: int, mode="affine"):
    """Random dense weights (weight, scales, biases) as mlx stores them: affine-quantized,
    mxfp4, or unquantized with no scales or biases when `bits` is None."""
    experts = quantized_experts(
        1, rows, d, group_size=group_size, bits=bits, dtype=dtype, seed=seed, mode=mode
    )
    return tuple(None if a is None else a[0] for a in experts)


def example():
    x = mx.random.normal((1, 1, 256), key=mx.random.key(61)).astype(mx.bfloat16)
    g = quantized_linear(40, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=62)
    u = quantized_linear(40, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=63)
    return (x, *g, *u), dict(group_size=64, bits=4)


swiglu_mlp = KernelDef(name="swiglu_mlp", reference=reference, launch=launch, example=example, **SHARED)
