"""mla_decode_q: MLA decode attention over a quantized latent cache, dequantized in the kernel (close).

mlx-lm's `QuantizedKVCache` holds MLA's latent (its keys) and roped k_pe (its values) as MLX's
affine quantization: packed uint32 words, scales and biases in the activations' dtype, one per
group of 32 or 64 values along the row. The plain-MLX path (zmlx.latent_quant.latent_attention)
dequantizes both into new arrays, then runs mlx-lm's attention; this kernel reads the packed
words, scales and biases directly and dequantizes in registers, as flash-decoding: the
positions split into mla_attention's chunks (chunk_size), one threadgroup per (b, chunk, head
group), each warp on its own for HEADS_PER_WARP heads with an online softmax, in float32 past
the dequantized values (q * scale + bias rounded once to the activations' dtype: the values
the cache holds, as mx.dequantize gives them). It writes mla_decode's partials (o (B, C, H, R)
the exp-weighted latent sum, m and l (B, C, H) the max score and exp sum), so mla_unembed
combines them and projects through unembed_out in one more launch; `combine` is the same
combine in plain MLX (tests, and a caller that wants the attention before unembed_out).

Its arguments are latent_attention's (q_nope after embed_q, q_pe roped and not scaled, the
cache's two triples), unpacked: the partials' reference dequantizes as the kernel does and runs
mla_attention's chunked float32 reference; combined, it is latent_attention's result up to
rounding (latent_attention rounds to the activations' dtype at every step).

On CUDA with bf16 activations the chunks run on tensor cores instead (mla_decode's
zmlx_mla_decode_mma_rows, its fragments dequantized to bf16 as they load: the values
mx.dequantize holds in a bf16 cache; the queries split into bf16 hi + lo parts).

Device code: csrc/mla_decode_q_body.h; csrc/mla_decode_q.h (the tensor-core path's
dequantizing loader); mla_attention's headers csrc/mla.h (the chunk size, warp sums) and
csrc/mla_mma.h (the tensor-core path); csrc/mla_decode_fma.h (mla_decode's FMA path's grid and online-softmax
step, and this kernel's packed-word loader for that path).
"""

from __future__ import annotations

import math

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code, float_bits
from zmlx.kernels.mla_attention import (
    CHUNK_STEP,
    HEADS_PER_WARP,
    MIN_CHUNK,
    TARGET_CHUNKS,
    TP,
    _mma_fits,
    chunk_size,
    decode_reference,
)

BITS = (4, 8)
GROUP_SIZES = (32, 64)
# On CUDA with bf16 activations, a GLM-like shape runs mla_decode's tensor-core path over the
# dequantized fragments (one threadgroup of latent / 64 warps per chunk); False: the FMA path.
USE_MMA = True
# The FMA path: at most 8 warps share a chunk, so that a threadgroup fits the SM's 64K registers
# at any register count the compiler picks (<= 255 per thread; mla_decode's 10 warps need <= 204).
WARPS_PER_BLOCK = 8
_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def _dequantized(w, s, b, group_size, bits):
    """The values a cache of the scales' dtype holds, in float32: MLX's affine dequantization
    q * scale + bias in float32, rounded once to that dtype (both kernel paths round so: the
    tensor-core path feeds them to bf16 mma)."""
    f32 = mx.float32
    v = mx.dequantize(w, s.astype(f32), b.astype(f32), group_size=group_size, bits=bits)
    return v.astype(s.dtype).astype(f32)


def reference(q_nope, q_pe, lw, ls, lb, pw, ps, pb, *, scale, group_size, bits):
    """q_nope (B, H, 1, R) after embed_q, q_pe (B, H, 1, RD) roped, not scaled; (lw, ls, lb)
    and (pw, ps, pb) the cache's latent and k_pe triples of S positions -> mla_decode's
    partials over `chunk_size(S)` chunks, float32: o (B, C, H, R), m (B, C, H), l (B, C, H)."""
    lat = _dequantized(lw, ls, lb, group_size, bits)  # (B, 1, S, R)
    kpe = _dequantized(pw, ps, pb, group_size, bits)
    qv = q_nope[:, :, 0].astype(mx.float32)
    return decode_reference(qv, q_pe.astype(mx.float32) * scale, lat, kpe, scale=scale)


def combine(o, m, lsum, dtype):
    """The partials combined: the attention output before unembed_out, (B, H, 1, R) in `dtype`
    (mla_unembed's combine, without its projection)."""
    a = mx.exp(m - m.max(axis=1, keepdims=True))  # (B, C, H)
    x = (a[..., None] * o).sum(axis=1) / (a * lsum).sum(axis=1)[..., None]  # (B, H, R)
    return x[:, :, None, :].astype(dtype)


def launch(backend, q_nope, q_pe, lw, ls, lb, pw, ps, pb, *, scale, group_size, bits) -> Launch | Skip:
    dtype = q_nope.dtype
    if dtype not in _DTYPES or any(a.dtype != dtype for a in (q_pe, ls, lb, ps, pb)):
        return Skip(f"q_nope {dtype}, q_pe {q_pe.dtype}, scales/biases {ls.dtype}: one float dtype needed")
    if lw.dtype != mx.uint32 or pw.dtype != mx.uint32:
        return Skip(f"packed latent {lw.dtype} / k_pe {pw.dtype}: uint32 needed")
    if bits not in BITS or group_size not in GROUP_SIZES:
        return Skip(f"{bits}-bit, group {group_size}: 4 or 8 bits, groups of 32 or 64 needed")
    if q_nope.ndim != 4 or q_nope.shape[2] != 1:
        return Skip(f"q_nope {q_nope.shape}: one token (B, H, 1, R) needed")
    bsz, heads, _, r = q_nope.shape
    rd = q_pe.shape[-1]
    if q_pe.shape != (bsz, heads, 1, rd):
        return Skip(f"q_pe {q_pe.shape} for q_nope {q_nope.shape}")
    if r % group_size or rd % group_size or r > 2048 or rd > 512 or heads > 256:
        return Skip(f"latent {r}, rope {rd} (multiples of the group {group_size} needed), {heads} heads")
    uv = 32 // bits
    length = lw.shape[2] if lw.ndim == 4 else 0
    want = {
        "lw": (lw, (bsz, 1, length, r // uv)),
        "ls": (ls, (bsz, 1, length, r // group_size)),
        "lb": (lb, (bsz, 1, length, r // group_size)),
        "pw": (pw, (bsz, 1, length, rd // uv)),
        "ps": (ps, (bsz, 1, length, rd // group_size)),
        "pb": (pb, (bsz, 1, length, rd // group_size)),
    }
    for name, (arr, shape) in want.items():
        if arr.shape != shape:
            return Skip(f"cache {name} {arr.shape}: {shape} needed ({bits}-bit, group {group_size})")
    if not 0 < length < 2**31 // max(r, 1):
        return Skip(f"{length} positions")
    c = math.ceil(length / chunk_size(length))
    mma = USE_MMA and _mma_fits(backend, dtype, heads, r, rd)
    hpw = min(HEADS_PER_WARP, heads)
    wpb = min(WARPS_PER_BLOCK, math.ceil(heads / hpw))
    groups = 1 if mma else math.ceil(heads / (hpw * wpb))
    threads = (r // 64) * 32 if mma else wpb * 32
    return Launch(
        inputs=[q_nope, q_pe, lw, ls, lb, pw, ps, pb],
        template=[
            ("T", dtype),
            ("H", heads),
            ("R", r),
            ("RD", rd),
            ("BITS", bits),
            ("GS", group_size),
            ("MMA", int(mma)),
            ("HPW", hpw),
            ("WPB", wpb),
            ("TP", TP),
            ("MINCH", MIN_CHUNK),
            ("CS", CHUNK_STEP),
            ("TARGET", TARGET_CHUNKS),
            ("SCALE_BITS", float_bits(scale)),
        ],
        grid=(bsz * c * groups * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(bsz, c, heads, r), (bsz, c, heads), (bsz, c, heads)],
        output_dtypes=[mx.float32] * 3,
    )


def inputs(bsz, heads, r, rd, length, dtype, *, group_size, bits, seed=0, spare=5):
    """A decode step's inputs: q_nope, q_pe and the quantized latent and k_pe of `length`
    positions, each a view of a longer buffer (as QuantizedKVCache.update_and_fetch returns)."""
    ks = mx.random.split(mx.random.key(seed), 4)
    q_nope = mx.random.normal((bsz, heads, 1, r), key=ks[0]).astype(dtype)
    q_pe = mx.random.normal((bsz, heads, 1, rd), key=ks[1]).astype(dtype)
    quant = dict(group_size=group_size, bits=bits)
    lat = mx.quantize(mx.random.normal((bsz, 1, length + spare, r), key=ks[2]).astype(dtype), **quant)
    kpe = mx.quantize(mx.random.normal((bsz, 1, length + spare, rd), key=ks[3]).astype(dtype), **quant)
    view = tuple(a[:, :, :length] for a in (*lat, *kpe))
    return (q_nope, q_pe, *view), dict(scale=(r + rd) ** -0.5, **quant)


def _example():  # bf16, latent 256 and rope 64: on CUDA the tensor-core path
    return inputs(1, 3, 256, 64, 150, mx.bfloat16, group_size=64, bits=4, seed=71)


mla_decode_q = KernelDef(
    name="mla_decode_q",
    reference=reference,
    fidelity="close",
    reference_is_stock=False,  # a float32 computation, not mlx-lm's op sequence
    tolerance=1e-4,
    body=device_code("mla_decode_q_body.h"),
    header=device_code("mla.h", "mla_mma.h", "mla_decode_fma.h", "mla_decode_q.h"),
    input_names=("qn", "qp", "lw", "ls", "lb", "pw", "ps", "pb"),
    output_names=("o", "m", "l"),
    launch=launch,
    example=_example,
)
