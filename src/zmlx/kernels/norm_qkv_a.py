"""norm_qkv_a: the input RMSNorm and the q_a and kv_a projections of MLA attention in one
launch (decode; launch A of the mla_block).

Stock (mlx-lm `glm4_moe_lite`: the decoder layer's input_layernorm, then
`Glm4MoeLiteAttention`'s first two projections of the normalized row):

    xn  = mx.fast.rms_norm(x, norm_w, eps)   # input_layernorm, T
    q_a = q_a_proj(xn)                       # (..., q_lora_rank); q_proj(xn) when q_lora_rank is None
    ckv = kv_a_proj_with_mqa(xn)             # (..., kv_lora_rank + qk_rope_head_dim)

each projection mlx's `QuantizedLinear` (quantized_matmul, transposed, affine) or `Linear`
(`xn @ w.T`), without bias. The two may be packed differently (`kv_group_size`, `kv_bits`).

Fused: the rows of both weight matrices are spread over many threadgroups of TG threads
(one row per warp), so that the few thousand rows of a decode step fill the GPU. Every
threadgroup recomputes the RMS of the short input row in MLX's rms_norm order
(residual_norm's geometry; warps past its BLOCK add +0.0 where MLX's reduction has its
zero fill, as in norm_router), keeps xn in threadgroup memory, and its warps compute their
rows' dots, each rounded to T. Three stock launches become one; xn never leaves the chip.

Fidelity: on CUDA the dots are MLX's qmv order (gemv for unquantized weights: see
norm_router) through csrc/quant.h's `zmlx_qdot_lane`, so both outputs are bitwise stock
wherever stock runs those matvecs: one token (a dense matmul leaves qmv and gemv from 2
rows on sm90), scales in x's dtype; other calls take the reference. On Metal the dot is a
plain float32 sum (`close`).

Device code: csrc/norm_qkv_a_body.h (the body); csrc/quant.h (the qmv/gemv-order dot),
csrc/residual_norm.h (the square-accumulate, and ZMLX_RMS_INV: the sums reduced, the rsqrt)
and csrc/norm_qkv_a.h (a helper of the Metal dot) as its header.
"""

from __future__ import annotations

import math

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code, float_bits
from zmlx.kernels.precision import precision
from zmlx.kernels.quant import (
    linear_reason,
    or_placeholder,
    packing,
    regime_reason,
    weights_of,
    weights_reason,
)
from zmlx.kernels.residual_norm import geometry
from zmlx.kernels.swiglu_mlp import quantized_linear


def reference(
    x,
    norm_w,
    qa_w,
    qa_s,
    qa_b,
    kva_w,
    kva_s,
    kva_b,
    *,
    eps,
    group_size=None,
    bits=None,
    kv_group_size=None,
    kv_bits=None,
    f32=False,
):
    """mlx-lm's op sequence. x (..., D) in T, norm_w (D,), weights (R, D) or packed ->
    (q_a (..., Rq), ckv (..., Rkv)) in T (scales/biases None: an unquantized Linear).
    f32: the same in float32 throughout, no rounding to T in between (reference_f32)."""
    p = precision(f32)
    xn = mx.fast.rms_norm(p.cast(x), p.cast(norm_w), eps)
    return (
        p.dense(xn, qa_w, qa_s, qa_b, group_size, bits),
        p.dense(xn, kva_w, kva_s, kva_b, kv_group_size, kv_bits),
    )


def reference_f32(*args, **kwargs):
    """reference's math in float32 throughout: the accuracy bar."""
    return reference(*args, f32=True, **kwargs)


_DTYPES = (mx.bfloat16, mx.float16, mx.float32)
# threadgroup memory the body may declare (xn and the warp sums): Metal's limit
_SHARED_BYTES = 32768
# threads per group (at least rms's BLOCK): 8 warps, one row each, so GLM-4.7-Flash's
# 1344 rows make 168 groups: every SM of an H100/H200 busy, the RMS recomputed cheaply
_THREADS = 256


def launch(
    backend,
    x,
    norm_w,
    qa_w,
    qa_s,
    qa_b,
    kva_w,
    kva_s,
    kva_b,
    *,
    eps,
    group_size=None,
    bits=None,
    kv_group_size=None,
    kv_bits=None,
) -> Launch | Skip:
    if x.dtype not in _DTYPES or norm_w.dtype != x.dtype:
        return Skip(f"x {x.dtype}, norm weight {norm_w.dtype} (one float dtype needed)")
    if x.ndim < 1 or norm_w.shape != x.shape[-1:]:
        return Skip(f"shapes x {x.shape}, norm weight {norm_w.shape}")
    d = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    if rows == 0 or d == 0:
        return Skip("empty input")
    for name, w, s, b, gs, nbits in (
        ("q_a", qa_w, qa_s, qa_b, group_size, bits),
        ("kv_a", kva_w, kva_s, kva_b, kv_group_size, kv_bits),
    ):
        why = weights_reason(w, s, b, cols=d, group_size=gs, bits=nbits, dtype=x.dtype)
        if why is None and w.ndim != 2:
            why = f"weights {w.shape} (one matrix needed)"
        # a dense matmul leaves its matvec (qmv or gemv) from 2 rows
        why = why or regime_reason(backend, rows, x.dtype, s, b, w, qmv_rows=2, gemv_rows=2)
        if why is not None:
            return Skip(f"{name}: {why}")
    geo = geometry(backend, d, x.dtype.size)
    if isinstance(geo, Skip):
        return geo
    block, chunks, nr = geo
    if chunks * nr > 64:
        return Skip(f"row of {d} needs {chunks * nr} values per thread")
    if d * x.dtype.size + 4 * 32 > _SHARED_BYTES:
        return Skip(f"row of {d} {x.dtype} does not fit in threadgroup memory")
    rq, rkv = qa_w.shape[0], kva_w.shape[0]
    threads = max(block, _THREADS)
    groups = math.ceil((rq + rkv) / (threads // 32))  # per token
    if rows * groups * threads >= 2**31:
        return Skip(f"{rows} tokens x {rq + rkv} rows is too large for one launch")
    gs, nbits = packing(d, group_size, bits)
    kv_gs, kv_nbits = packing(d, kv_group_size, kv_bits)
    lead = x.shape[:-1]
    return Launch(
        inputs=[
            x,
            norm_w,
            qa_w,
            or_placeholder(qa_s, qa_w),
            or_placeholder(qa_b, qa_w),
            kva_w,
            or_placeholder(kva_s, kva_w),
            or_placeholder(kva_b, kva_w),
        ],
        template=[
            ("T", x.dtype),
            ("D", d),
            ("BLOCK", block),
            ("CHUNKS", chunks),
            ("NR", nr),
            ("TG", threads),
            ("G", groups),
            ("RQ", rq),
            ("RKV", rkv),
            ("GS", gs),
            ("BITS", nbits),
            ("KV_GS", kv_gs),
            ("KV_BITS", kv_nbits),
            ("EPS_BITS", float_bits(eps)),
        ],
        grid=(rows * groups * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[lead + (rq,), lead + (rkv,)],
        output_dtypes=[x.dtype, x.dtype],
    )


def attention_reason(attn) -> str | None:
    """Why an mlx-lm MLA attention's q_a (or q) and kv_a projections cannot go through the
    kernel (a bias, from attention_bias=True; a quantization mode it does not read), or None."""
    q_name = "q_proj" if getattr(attn, "q_lora_rank", None) is None else "q_a_proj"
    for name in (q_name, "kv_a_proj_with_mqa"):
        if (why := linear_reason(name, getattr(attn, name))) is not None:
            return why
    return None


def attention_args(norm, attn) -> tuple[tuple, dict]:
    """(args, kwargs) of the kernel for a decoder layer's input_layernorm `norm` and its MLA
    attention `attn` (projections checked by `attention_reason`); x is the first argument."""
    q = attn.q_proj if getattr(attn, "q_lora_rank", None) is None else attn.q_a_proj
    (qw, qkw), (kvw, kvkw) = weights_of(q), weights_of(attn.kv_a_proj_with_mqa)
    kw = dict(eps=norm.eps, **qkw, kv_group_size=kvkw["group_size"], kv_bits=kvkw["bits"])
    return (norm.weight, *qw, *kvw), kw


def inputs(lead, d, rq, rkv, dtype, seed, *, group_size=None, bits=None, kv_group_size=None, kv_bits=None):
    """Random (x, norm_w, q_a weights, kv_a weights) and kwargs at a decoder layer's scales."""
    keys = mx.random.split(mx.random.key(seed), 2)
    x = mx.random.normal((*lead, d), key=keys[0]).astype(dtype)
    norm_w = (1 + 0.1 * mx.random.normal((d,), key=keys[1])).astype(dtype)
    q = quantized_linear(rq, d, group_size=group_size, bits=bits, dtype=dtype, seed=seed + 1)
    kv = quantized_linear(rkv, d, group_size=kv_group_size, bits=kv_bits, dtype=dtype, seed=seed + 2)
    kw = dict(eps=1e-5, group_size=group_size, bits=bits, kv_group_size=kv_group_size, kv_bits=kv_bits)
    return (x, norm_w, *q, *kv), kw


def example():
    # one token (CUDA's regime), an odd width (a remainder tile of the 4-bit dot), odd row
    # counts, the two projections packed differently
    return inputs((1, 1), 320, 40, 21, mx.bfloat16, 81, group_size=64, bits=4, kv_group_size=32, kv_bits=8)


norm_qkv_a = KernelDef(
    name="norm_qkv_a",
    reference=reference,
    fidelity="close",
    exact_on=("cuda",),  # bitwise stock's rms_norm + qmv/gemv where launch() takes the call
    tolerance=2**-3,  # the self-check only: a few roundings of T, far below a layout error
    body=device_code("norm_qkv_a_body.h"),
    header=device_code("quant.h", "residual_norm.h", "norm_qkv_a.h"),
    input_names=("x", "norm_w", "qa_w", "qa_s", "qa_b", "kva_w", "kva_s", "kva_b"),
    output_names=("q_a", "ckv"),
    launch=launch,
    example=example,
)
