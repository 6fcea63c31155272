"""mla_attention: MLA's latent-space decode attention in three launches (close).

Stock, per attention layer and decoded token (mlx-lm `Glm4MoeLiteAttention`, after the
rope): `embed_q(q_nope)` (a batched quantized matmul), `pe_scores = q_pe @ k_pe^T`,
scaled_dot_product_attention over the latent cache with pe_scores as an additive mask
(MLX's composed fallback at head dim 512: scale, GEMM, add, softmax, GEMM) and
`unembed_out`: about a dozen launches, each rounding to bf16. Here, in float32 throughout:

1. `mla_embed_q`: qv[b, h] = W_q[h] @ q_nope[b, h] (R = kv_lora_rank outputs per head),
   read from the q projection's output in place (no copy), weights affine 4/8-bit or
   unquantized. One threadgroup per (b, h, 32 rows), q_nope staged in threadgroup memory,
   each warp 4 rows at once (their loads in flight together), a lane a packed word a row.
2. `mla_decode` (flash-decoding): the positions are split into at most TARGET_CHUNKS chunks
   (at least MIN_CHUNK positions each); one threadgroup per (b, chunk, head group), each
   warp on its own for HEADS_PER_WARP heads: TP positions at a time, the latent and rope
   rows in registers (vector loads), the scores `scale * qv . latent[p] + q_pe . k_pe[p]`
   by warp sums, an online softmax (running max m, exp sum l) and the exp-weighted sum of
   latent rows o. No threadgroup memory, no barriers; the warps of a threadgroup share the
   chunk's rows through L1. On CUDA with a bf16 cache the chunk runs on tensor cores
   instead (mma.m16n8k16: one threadgroup of latent / 64 warps, 16 positions a step, qv
   and the softmax weights split into bf16 hi + lo parts so the products keep ~16 bits;
   see zmlx_mla_decode_mma). The cache is mlx-lm's own buffer (keys = latent, values =
   k_pe), read up to the current length.
3. `mla_unembed`: per (b, h), the chunks combined once by the whole threadgroup (each
   thread a quad of latent values over every CL-th chunk with its own running max, so all
   its loads are independent; then the partial sums rescaled to the largest max in
   threadgroup memory), then projected through W_out[h] to the head's v_head_dim outputs,
   each warp 8 rows at once, rounded to the activations' dtype.

The context length and the chunk count travel in the inputs' shapes (kernel arguments), so
a kernel is built once per model shape, not per token, and no per-token array is made on
the host: on CUDA, MLX puts a small host-made array in managed memory, and a kernel that
reads it waits for its page to migrate. Fidelity `close`: each kernel is
checked against a float32 reference (its tolerance below); stock itself rounds to bf16
at every step, so the result is nearer float32 than stock is, but not stock's bits.

Device code: csrc/mla.h, the three kernels' shared header (loads, the quantized row dots
`zmlx_mla_rows`, the chunk size); csrc/mla_mma.h, mla_decode's tensor-core path
`zmlx_mla_decode_mma` (mla_decode's header only); csrc/mla_decode_body.h and
csrc/mla_unembed_body.h, those kernels' bodies; csrc/mla_decode_fma.h, the pieces of
mla_decode's FMA path that mla_decode_q shares; mla_embed_q's body is EMBED_Q_BODY below.
"""

from __future__ import annotations

import math

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code, float_bits
from zmlx.kernels.quant import dequantized, or_placeholder, packing, weights_reason

# mla_decode: a chunk is at least MIN_CHUNK positions, a multiple of CHUNK_STEP, and a
# context is split into at most TARGET_CHUNKS chunks (the partials unembed combines grow with
# the chunk count). On CUDA with a bf16 cache (USE_MMA) a threadgroup of latent / 64 warps
# runs the chunk on tensor cores; otherwise each warp scores HEADS_PER_WARP heads, TP
# positions at a time, and at most WARPS_PER_BLOCK warps share a chunk's rows (L1).
MIN_CHUNK = 32
CHUNK_STEP = 16
TARGET_CHUNKS = 128
USE_MMA = True
HEADS_PER_WARP = 2
WARPS_PER_BLOCK = 10
TP = 4
EMBED_RW = 4  # mla_embed_q: rows per warp, computed together (their loads in flight at once)
UNEMBED_RW = 8  # mla_unembed: the same
THREADS = 256  # mla_embed_q
UNEMBED_THREADS = 512  # Metal
UNEMBED_THREADS_CUDA = 1024  # the kernel needs <= 56 registers, so 1024 fit
_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def _dot(a, b):
    """sum(a * b) over the last axis, in float32, broadcasting the rest: the references'
    products without matmul (MLX's CUDA matmul runs float32 as TF32 by default, too coarse
    for a float32 reference)."""
    return (a * b).sum(axis=-1)


# ---------------------------------------------------------------- 1. embed_q


def embed_q_reference(q, w, s, b, *, heads, head_dim, nope, group_size, bits):
    """q (B, 1, heads * head_dim) the q projection's output (q_nope = each head's first `nope`
    values); w the per-head (heads, R, nope) weights (quantized or not) -> qv (B, heads, R)
    float32."""
    wf = dequantized(w, s, b, group_size, bits)  # (heads, R, nope) float32
    qn = q.reshape(q.shape[0], heads, head_dim)[..., :nope].astype(mx.float32)
    return _dot(wf[None], qn[:, :, None, :])


EMBED_Q_BODY = """
ZMLX_SHARED float xs[NOPE];
const uint nb = (R + RB - 1) / RB;
const uint rb = zmlx_gid % nb;
const uint h = (zmlx_gid / nb) % H;
const uint b = zmlx_gid / (nb * H);
for (uint k = zmlx_lid; k < NOPE; k += NT) xs[k] = static_cast<float>(q[(size_t(b) * H + h) * QW + k]);
ZMLX_BARRIER;
ZMLX_MLA_X_UNITS(BITS, NOPE, xs, xr, xsum)
const uint j0 = rb * RB + zmlx_warp * RW;
if (j0 < R) {  // the same for the whole warp
    const uint nrows = R - j0 < RW ? R - j0 : RW;
    float acc[RW];
    zmlx_mla_rows<BITS, GS, NOPE, RW>(w, s, bi, size_t(h) * R + j0, nrows, zmlx_lane, xr, xsum, acc);
    for (uint r = 0; r < nrows; ++r) {
        if (zmlx_lane == 0) qv[(size_t(b) * H + h) * R + j0 + r] = acc[r];
    }
}
"""


def embed_q_launch(backend, q, w, s, b, *, heads, head_dim, nope, group_size, bits) -> Launch | Skip:
    if q.dtype not in _DTYPES or q.ndim != 3 or q.shape[1] != 1 or q.shape[-1] != heads * head_dim:
        return Skip(f"q {q.shape} {q.dtype}: one token of {heads} heads x {head_dim} needed")
    if not 0 < nope <= head_dim or nope > 4096:
        return Skip(f"nope {nope} of head {head_dim}")
    if w.ndim != 3 or w.shape[0] != heads:
        return Skip(f"embed_q weights {w.shape} for {heads} heads")
    if why := weights_reason(w, s, b, cols=nope, group_size=group_size, bits=bits, dtype=q.dtype):
        return Skip(f"embed_q: {why}")
    r = w.shape[1]
    gs, nbits = packing(nope, group_size, bits)
    if nope % (4 if nbits == 32 else 32 // nbits):
        return Skip(f"nope {nope}: a whole number of packed words (or of 4 values) per row needed")
    rows = (THREADS // 32) * EMBED_RW
    blocks = q.shape[0] * heads * math.ceil(r / rows)
    return Launch(
        inputs=[q, w, or_placeholder(s, q), or_placeholder(b, q)],
        template=[
            ("H", heads),
            ("QW", head_dim),
            ("NOPE", nope),
            ("R", r),
            ("RB", rows),
            ("RW", EMBED_RW),
            ("NT", THREADS),
            ("GS", gs),
            ("BITS", nbits),
        ],
        grid=(blocks * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(q.shape[0], heads, r)],
        output_dtypes=[mx.float32],
    )


def _embed_q_example():
    from zmlx.kernels.moe_mlp import quantized_experts

    kw = dict(heads=3, head_dim=96, nope=64, group_size=64, bits=4)
    q = mx.random.normal((1, 1, 3 * 96), key=mx.random.key(51)).astype(mx.bfloat16)
    w, s, b = quantized_experts(3, 80, 64, dtype=mx.bfloat16, seed=52, group_size=64, bits=4)
    return (q, w, s, b), kw


mla_embed_q = KernelDef(
    name="mla_embed_q",
    reference=embed_q_reference,
    fidelity="close",
    reference_is_stock=False,  # a float32 computation, not mlx-lm's bf16 op sequence
    tolerance=1e-4,
    body=EMBED_Q_BODY,
    header=device_code("mla.h"),
    input_names=("q", "w", "s", "bi"),
    output_names=("qv",),
    launch=embed_q_launch,
    example=_embed_q_example,
)


# ---------------------------------------------------------------- 2. decode (chunks)


def chunk_size(length: int) -> int:
    """Positions per mla_decode chunk for a context of `length`: MIN_CHUNK, grown (in steps of
    CHUNK_STEP) so that there are at most TARGET_CHUNKS chunks."""
    return max(MIN_CHUNK, CHUNK_STEP * math.ceil(length / (CHUNK_STEP * TARGET_CHUNKS)))


def _mma_fits(backend, dtype, heads, r, rd) -> bool:
    """Whether mla_decode takes its tensor-core path (CUDA, bf16 cache, GLM-like shape)."""
    return (
        USE_MMA
        and backend == "cuda"
        and dtype == mx.bfloat16
        and r % 64 == 0
        and 64 <= r <= 1024
        and rd % 16 == 0
        and 0 < rd // 16 <= r // 64
        and heads <= 32
    )


def decode_reference(qv, q_pe, lat, kpe, *, scale):
    """qv (B, H, R) float32, q_pe (B, H, 1, RD) (already scaled, as glm47_rope gives it),
    lat (B, 1, S, R) and kpe (B, 1, S, RD) the cache's S positions (what mlx-lm's
    `update_and_fetch` returns: views of its buffers) -> per chunk of `chunk_size(S)`
    positions: o (B, C, H, R) the exp-weighted latent sum, m (B, C, H) the max score, l (B, C, H)
    the exp sum."""
    bsz, heads, r = qv.shape
    length = lat.shape[2]
    ch = chunk_size(length)
    c = math.ceil(length / ch)
    lat = lat[:, 0].astype(mx.float32)  # (B, S, R)
    kpe = kpe[:, 0].astype(mx.float32)
    scores = scale * _dot(qv[:, :, None, :], lat[:, None]) + _dot(
        q_pe[:, :, 0, None].astype(mx.float32), kpe[:, None]
    )  # (B, H, S)
    pad = c * ch - length
    scores = mx.pad(scores, [(0, 0), (0, 0), (0, pad)], constant_values=-mx.inf)  # (B, H, C*CH)
    scores = scores.reshape(bsz, heads, c, ch).transpose(0, 2, 1, 3)  # (B, C, H, CH)
    m = scores.max(axis=-1)
    e = mx.exp(scores - m[..., None])
    lat = mx.pad(lat, [(0, 0), (0, pad), (0, 0)]).reshape(bsz, c, ch, r)
    o = _dot(e[..., None, :], lat[:, :, None].swapaxes(-1, -2))  # (B, C, H, R)
    return o, m, e.sum(axis=-1)


def decode_launch(backend, qv, q_pe, lat, kpe, *, scale) -> Launch | Skip:
    if qv.dtype != mx.float32 or qv.ndim != 3:
        return Skip(f"qv {qv.shape} {qv.dtype}: float32 (B, H, R) needed")
    bsz, heads, r = qv.shape
    if lat.dtype not in _DTYPES or kpe.dtype != lat.dtype or q_pe.dtype != lat.dtype:
        return Skip(f"latent {lat.dtype}, k_pe {kpe.dtype}, q_pe {q_pe.dtype}: one float dtype needed")
    if lat.ndim != 4 or lat.shape[:2] != (bsz, 1) or lat.shape[-1] != r or kpe.shape[:3] != lat.shape[:3]:
        return Skip(f"cache buffers {lat.shape} / {kpe.shape} for qv {qv.shape}")
    rd = kpe.shape[-1]
    if q_pe.shape != (bsz, heads, 1, rd):
        return Skip(f"q_pe {q_pe.shape} for {heads} heads of {rd}")
    if r % 128 or rd % 64 or r > 2048 or rd > 256 or heads > 256:
        return Skip(f"latent {r}, rope {rd} (multiples of 128 and 64 needed), {heads} heads")
    length = lat.shape[2]
    if not 0 < length < 2**31 // max(r, 1):
        return Skip(f"{length} positions")
    ch = chunk_size(length)
    c = math.ceil(length / ch)
    mma = _mma_fits(backend, lat.dtype, heads, r, rd)
    hpw = min(HEADS_PER_WARP, heads)
    wpb = min(WARPS_PER_BLOCK, math.ceil(heads / hpw))
    groups = math.ceil(heads / (hpw * wpb))
    threads, blocks = ((r // 64) * 32, bsz * c) if mma else (wpb * 32, bsz * c * groups)
    return Launch(
        inputs=[qv, q_pe, lat, kpe],
        template=[
            ("T", lat.dtype),
            ("H", heads),
            ("R", r),
            ("RD", rd),
            ("MMA", int(mma)),
            ("HPW", hpw),
            ("WPB", wpb),
            ("TP", TP),
            ("MINCH", MIN_CHUNK),
            ("CS", CHUNK_STEP),
            ("TARGET", TARGET_CHUNKS),
            ("SCALE_BITS", float_bits(scale)),
        ],
        grid=(blocks * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(bsz, c, heads, r), (bsz, c, heads), (bsz, c, heads)],
        output_dtypes=[mx.float32] * 3,
    )


def _decode_example():
    qv = mx.random.normal((1, 3, 128), key=mx.random.key(53))
    q_pe = mx.random.normal((1, 3, 1, 64), key=mx.random.key(54)).astype(mx.bfloat16)
    lat = mx.random.normal((1, 1, 256, 128), key=mx.random.key(55)).astype(mx.bfloat16)
    kpe = mx.random.normal((1, 1, 256, 64), key=mx.random.key(56)).astype(mx.bfloat16)
    return (qv, q_pe, lat[:, :, :150], kpe[:, :, :150]), {"scale": 0.125}


mla_decode = KernelDef(
    name="mla_decode",
    reference=decode_reference,
    fidelity="close",
    reference_is_stock=False,  # a float32 computation, not mlx-lm's bf16 op sequence
    tolerance=1e-4,
    body=device_code("mla_decode_body.h"),
    header=device_code("mla.h", "mla_mma.h", "mla_decode_fma.h"),
    input_names=("qv", "q_pe", "lat", "kpe"),
    output_names=("o", "m", "l"),
    launch=decode_launch,
    example=_decode_example,
)


# ---------------------------------------------------------------- 3. combine + unembed


def unembed_reference(o, m, lsum, w, s, b, *, dtype, group_size, bits):
    """o (B, C, H, R), m and l (B, C, H) from mla_decode; w the per-head (H, V, R) weights
    -> the attention output through unembed_out, (B, H, 1, V) in `dtype`."""
    mmax = m.max(axis=1, keepdims=True)
    a = mx.exp(m - mmax)  # (B, C, H)
    x = (a[..., None] * o).sum(axis=1) / (a * lsum).sum(axis=1)[..., None]  # (B, H, R)
    wf = dequantized(w, s, b, group_size, bits)  # (H, V, R)
    return _dot(wf[None], x[:, :, None, :])[:, :, None, :].astype(dtype)


def unembed_launch(backend, o, m, lsum, w, s, b, *, dtype, group_size, bits) -> Launch | Skip:
    if o.dtype != mx.float32 or o.ndim != 4 or m.shape != o.shape[:3] or lsum.shape != m.shape:
        return Skip(f"partials o {o.shape}, m {m.shape}, l {lsum.shape}")
    bsz, _, heads, r = o.shape
    if dtype not in _DTYPES:
        return Skip(f"output dtype {dtype}")
    threads = UNEMBED_THREADS_CUDA if backend == "cuda" else UNEMBED_THREADS
    if r <= 0 or r % 4 or threads % (r // 4) or w.ndim != 3 or w.shape[0] != heads:
        return Skip(
            f"unembed_out weights {w.shape} for {heads} heads of latent {r} "
            f"(latent / 4 must divide {threads})"
        )
    if why := weights_reason(w, s, b, cols=r, group_size=group_size, bits=bits, dtype=dtype):
        return Skip(f"unembed_out: {why}")
    v = w.shape[1]
    gs, nbits = packing(r, group_size, bits)
    if r % (4 if nbits == 32 else 32 // nbits):
        return Skip(f"latent {r}: a whole number of packed words per row needed")
    return Launch(  # unquantized: m stands in for the scales and biases (never read)
        inputs=[o, m, lsum, w, or_placeholder(s, m), or_placeholder(b, m)],
        template=[
            ("T", dtype),
            ("H", heads),
            ("R", r),
            ("V", v),
            ("NT", threads),
            ("RW", UNEMBED_RW),
            ("GS", gs),
            ("BITS", nbits),
        ],
        grid=(bsz * heads * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(bsz, heads, 1, v)],
        output_dtypes=[dtype],
    )


def _unembed_example():
    from zmlx.kernels.moe_mlp import quantized_experts

    o = mx.random.normal((1, 3, 2, 128), key=mx.random.key(57))
    m = mx.random.normal((1, 3, 2), key=mx.random.key(58))
    lsum = 1 + mx.random.uniform(shape=(1, 3, 2), key=mx.random.key(59)) * 60
    w, s, b = quantized_experts(2, 70, 128, dtype=mx.bfloat16, seed=60, group_size=64, bits=4)
    return (o, m, lsum, w, s, b), dict(dtype=mx.bfloat16, group_size=64, bits=4)


mla_unembed = KernelDef(
    name="mla_unembed",
    reference=unembed_reference,
    fidelity="close",
    reference_is_stock=False,  # a float32 computation, not mlx-lm's bf16 op sequence
    tolerance=2e-2,  # bf16 output: one rounding of values ~1
    body=device_code("mla_unembed_body.h"),
    header=device_code("mla.h"),
    input_names=("o", "m", "l", "w", "s", "bi"),
    output_names=("out",),
    launch=unembed_launch,
    example=_unembed_example,
)
