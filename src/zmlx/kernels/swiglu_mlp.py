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
so the kernel is bitwise stock wherever stock runs qmv: for a dense matmul on the H100
that is one row (one token; from two rows stock takes its sm90 tiled qmm), and the
kernel takes only such calls. On Metal the dot is a plain float32 sum (`close`).
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from zmlx.kernels._core import KernelDef, Launch
from zmlx.kernels._quant import layout_reason, qmv_reason
from zmlx.kernels.moe_mlp import SHARED, quantized_experts


def reference(x, gate_w, gate_s, gate_b, up_w, up_s, up_b, *, group_size: int, bits: int):
    """mlx-lm's op sequence. x (..., D), weights (I, D * bits / 32) -> (..., I) in x's dtype."""
    from mlx_lm.models.activations import swiglu

    qmm = dict(transpose=True, group_size=group_size, bits=bits)
    gate = mx.quantized_matmul(x, gate_w, gate_s, gate_b, **qmm)
    up = mx.quantized_matmul(x, up_w, up_s, up_b, **qmm)
    return swiglu(gate, up)


def reference_f32(x, gate_w, gate_s, gate_b, up_w, up_s, up_b, *, group_size: int, bits: int):
    """The same in float32 throughout (no rounding to T in between): the accuracy bar."""
    def dense(w, s, b):
        return mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)

    xf = x.astype(mx.float32)
    g, u = xf @ dense(gate_w, gate_s, gate_b).T, xf @ dense(up_w, up_s, up_b).T
    return g * mx.sigmoid(g) * u


@functools.cache
def _no_indices() -> mx.array:
    # the shared body's index input, never read when DENSE
    return mx.zeros((1,), mx.uint32)


_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def launch(backend, x, gate_w, gate_s, gate_b, up_w, up_s, up_b, *, group_size, bits) -> Launch | str:
    if (why := layout_reason(bits, group_size)) is not None:
        return why
    if x.dtype not in _DTYPES or gate_s.dtype not in _DTYPES or up_s.dtype not in _DTYPES:
        return f"x {x.dtype}, scales {gate_s.dtype}"
    if gate_b is None or up_b is None:
        return "affine quantization without biases"
    d = x.shape[-1]
    if gate_w.ndim != 2 or gate_w.shape != up_w.shape or gate_w.shape[-1] * (32 // bits) != d:
        return f"weights {gate_w.shape} / {up_w.shape} for x of width {d}"
    i = gate_w.shape[0]
    if d % group_size or gate_s.shape != (i, d // group_size) or up_s.shape != gate_s.shape:
        return f"scales {gate_s.shape} for groups of {group_size}"
    n = math.prod(x.shape[:-1])
    if n == 0:
        return "no tokens"
    if (why := qmv_reason(backend, n, x.dtype, gate_s, gate_b, up_s, up_b, max_rows=2)) is not None:
        return why
    if n * i * 32 >= 2**31:
        return f"{n} tokens x {i} rows is too large for one launch"
    return Launch(
        inputs=[x, _no_indices(), gate_w, gate_s, gate_b, up_w, up_s, up_b],
        template=[("T", x.dtype), ("N", n), ("K", 1), ("I", i), ("D", d), ("GS", group_size), ("BITS", bits),
                  ("DENSE", True)],
        grid=(n * i * 32, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape[:-1] + (i,)],
        output_dtypes=[x.dtype],
    )


def quantized_linear(rows: int, d: int, *, group_size: int, bits: int, dtype, seed: int):
    """Random affine-quantized dense weights (weight, scales, biases) as mlx-lm stores them."""
    return tuple(a[0] for a in quantized_experts(1, rows, d, group_size=group_size, bits=bits,
                                                 dtype=dtype, seed=seed))


def example():
    x = mx.random.normal((1, 1, 256), key=mx.random.key(61)).astype(mx.bfloat16)
    g = quantized_linear(40, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=62)
    u = quantized_linear(40, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=63)
    return (x, *g, *u), dict(group_size=64, bits=4)


swiglu_mlp = KernelDef(name="swiglu_mlp", reference=reference, launch=launch, example=example, **SHARED)
