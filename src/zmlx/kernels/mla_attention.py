"""mla_attention: MLA's latent-space decode attention in three launches (close).

Stock, per attention layer and decoded token (mlx-lm `Glm4MoeLiteAttention`, after the
rope): `embed_q(q_nope)` (a batched quantized matmul), `pe_scores = q_pe @ k_pe^T`,
scaled_dot_product_attention over the latent cache with pe_scores as an additive mask
(MLX's composed fallback at head dim 512: scale, GEMM, add, softmax, GEMM) and
`unembed_out`: about a dozen launches, each rounding to bf16. Here, in float32 throughout:

1. `mla_embed_q`: qv[b, h] = W_q[h] @ q_nope[b, h] (R = kv_lora_rank outputs per head),
   read from the q projection's output in place (no copy), weights affine 4/8-bit or
   unquantized. One threadgroup per (b, h, 64 rows), q_nope staged in threadgroup memory,
   one warp per row.
2. `mla_decode` (flash-decoding): the positions are split into chunks of CH = 64; one
   threadgroup per (b, chunk) computes, for every head, the scores
   `scale * qv . latent[p] + q_pe . k_pe[p]` (the latent row read once for all heads),
   then per head the chunk's max m, the exponentials and their
   sum l, and the chunk's exp-weighted sum of latent rows o (each warp scores 4 positions
   at a time, so each head's qv is read once per 4 positions). The cache is mlx-lm's own
   buffer (keys = latent, values = k_pe), read up to the current length.
3. `mla_unembed`: per (b, h), the chunks combined once by the whole threadgroup (the
   largest max and the denominator by reductions, then the weighted latent tile by tile
   with the tile's chunk weights in threadgroup memory), then projected through W_out[h]
   to the head's v_head_dim outputs, one warp per row, rounded to the activations' dtype.

The current length and the cache's allocated length travel as an int32 input, so a
kernel is built once per model shape, not per token. Fidelity `close`: each kernel is
checked against a float32 reference (its tolerance below); stock itself rounds to bf16
at every step, so the result is nearer float32 than stock is, but not stock's bits.
"""

from __future__ import annotations

import math

import mlx.core as mx

from zmlx.kernels._core import KernelDef, Launch, float_bits
from zmlx.kernels._quant import dequantized, or_placeholder, packing, weights_reason

CHUNK = 64  # positions per mla_decode threadgroup
ROWS = 64  # output rows per threadgroup in mla_embed_q
THREADS = 256
_DTYPES = (mx.bfloat16, mx.float16, mx.float32)

HEADER = """
#ifdef ZMLX_CUDA
#define ZMLX_FN __device__ inline
#define ZMLX_UNROLL _Pragma("unroll")
#define ZMLX_UNROLL8 _Pragma("unroll 8")
#define ZMLX_EXP(v) expf(v)
#define ZMLX_FMAX(a, b) fmaxf((a), (b))
#else
#define ZMLX_FN inline
#define ZMLX_UNROLL
#define ZMLX_UNROLL8
#define ZMLX_EXP(v) metal::exp(v)
#define ZMLX_FMAX(a, b) metal::max((a), (b))
#endif
#define ZMLX_WARP_SUM(v) for (uint zmlx_m = 16; zmlx_m > 0; zmlx_m /= 2) (v) += ZMLX_SHFL_XOR((v), zmlx_m)
#define ZMLX_WARP_MAX(v) \\
    for (uint zmlx_m = 16; zmlx_m > 0; zmlx_m /= 2) (v) = ZMLX_FMAX((v), ZMLX_SHFL_XOR((v), zmlx_m))

// Weight (row, k) of a stack of rows of K values, in float: affine-quantized (packed
// words, one scale and bias per group of GS) or unquantized (BITS = 32, w is T).
template <int BITS, int GS, int K, typename S>
ZMLX_FN float zmlx_mla_w(const ZMLX_DEVICE uint* w, const ZMLX_DEVICE S* s, const ZMLX_DEVICE S* b,
                         size_t row, uint k) {
    constexpr uint PER_WORD = 32 / BITS;
    const uint word = w[row * (K / PER_WORD) + k / PER_WORD];
    const uint q = (word >> (BITS * (k % PER_WORD))) & ((1u << BITS) - 1u);
    const size_t g = row * (K / GS) + k / GS;
    return static_cast<float>(s[g]) * static_cast<float>(q) + static_cast<float>(b[g]);
}
template <int BITS, int GS, int K, typename S, typename W>
ZMLX_FN float zmlx_mla_w(const ZMLX_DEVICE W* w, const ZMLX_DEVICE S* s, const ZMLX_DEVICE S* b,
                         size_t row, uint k) {
    return static_cast<float>(w[row * K + k]);
}
"""


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
const uint nb = (R + ROWS - 1) / ROWS;
const uint rb = zmlx_gid % nb;
const uint h = (zmlx_gid / nb) % H;
const uint b = zmlx_gid / (nb * H);
for (uint k = zmlx_lid; k < NOPE; k += NT) xs[k] = static_cast<float>(q[(size_t(b) * H + h) * QW + k]);
ZMLX_BARRIER;
for (uint jj = zmlx_warp; jj < ROWS; jj += NT / 32) {
    const uint j = rb * ROWS + jj;
    if (j < R) {  // the same for the whole warp
        const size_t row = size_t(h) * R + j;
        float acc = 0.0f;
        for (uint k = zmlx_lane; k < NOPE; k += 32) {
            acc += zmlx_mla_w<BITS, GS, NOPE>(w, s, bi, row, k) * xs[k];
        }
        ZMLX_WARP_SUM(acc);
        if (zmlx_lane == 0) qv[(size_t(b) * H + h) * R + j] = acc;
    }
}
"""


def embed_q_launch(backend, q, w, s, b, *, heads, head_dim, nope, group_size, bits) -> Launch | str:
    if q.dtype not in _DTYPES or q.ndim != 3 or q.shape[1] != 1 or q.shape[-1] != heads * head_dim:
        return f"q {q.shape} {q.dtype}: one token of {heads} heads x {head_dim} needed"
    if not 0 < nope <= head_dim or nope > 4096:
        return f"nope {nope} of head {head_dim}"
    if w.ndim != 3 or w.shape[0] != heads:
        return f"embed_q weights {w.shape} for {heads} heads"
    if (why := weights_reason(w, s, b, cols=nope, group_size=group_size, bits=bits, dtype=q.dtype)):
        return f"embed_q: {why}"
    r = w.shape[1]
    gs, nbits = packing(nope, group_size, bits)
    blocks = q.shape[0] * heads * math.ceil(r / ROWS)
    return Launch(
        inputs=[q, w, or_placeholder(s, q), or_placeholder(b, q)],
        template=[("H", heads), ("QW", head_dim), ("NOPE", nope), ("R", r), ("ROWS", ROWS), ("NT", THREADS),
                  ("GS", gs), ("BITS", nbits)],
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
    header=HEADER,
    input_names=("q", "w", "s", "bi"),
    output_names=("qv",),
    launch=embed_q_launch,
    example=_embed_q_example,
)


# ---------------------------------------------------------------- 2. decode (chunks)


def decode_reference(qv, q_pe, lat, kpe, length, *, scale):
    """qv (B, H, R) float32, q_pe (B, H, 1, RD) (already scaled, as glm47_rope gives it),
    lat (B, 1, SA, R) and kpe (B, 1, SA, RD) the cache's buffers, of which the first
    `length` positions hold data -> per chunk of CHUNK positions: o (B, C, H, R) the
    exp-weighted latent sum, m (B, C, H) the max score, l (B, C, H) the exp sum."""
    bsz, heads, r = qv.shape
    c = math.ceil(length / CHUNK)
    lat = lat[:, 0, :length].astype(mx.float32)  # (B, S, R)
    kpe = kpe[:, 0, :length].astype(mx.float32)
    scores = (scale * _dot(qv[:, :, None, :], lat[:, None])
              + _dot(q_pe[:, :, 0, None].astype(mx.float32), kpe[:, None]))  # (B, H, S)
    pad = c * CHUNK - length
    scores = mx.pad(scores, [(0, 0), (0, 0), (0, pad)], constant_values=-mx.inf)  # (B, H, C*CH)
    scores = scores.reshape(bsz, heads, c, CHUNK).transpose(0, 2, 1, 3)  # (B, C, H, CH)
    m = scores.max(axis=-1)
    e = mx.exp(scores - m[..., None])
    lat = mx.pad(lat, [(0, 0), (0, pad), (0, 0)]).reshape(bsz, c, CHUNK, r)
    o = _dot(e[..., None, :], lat[:, :, None].swapaxes(-1, -2))  # (B, C, H, R)
    return o, m, e.sum(axis=-1)


DECODE_BODY = """
const int S = dims[0];
const int SA = dims[1];
const uint NC = (uint(S) + CH - 1) / CH;
const uint c = zmlx_gid % NC;
const uint b = zmlx_gid / NC;
const uint p0 = c * CH;
const uint n = uint(S) - p0 < uint(CH) ? uint(S) - p0 : uint(CH);
const float scale = ZMLX_FLOAT_BITS(SCALE_BITS);
const size_t lat0 = size_t(b) * size_t(SA) * R;
const size_t kpe0 = size_t(b) * size_t(SA) * RD;
ZMLX_SHARED float sc[H * CH];
// 1. scores: each warp takes PW positions at a time, their latent and rope rows read once
// for every head, each head's qv slice read once for the PW positions
for (uint i0 = zmlx_warp * PW; i0 < n; i0 += (NT / 32) * PW) {
    float lv[PW][R / 32];
    float kv[PW][RD / 32];
    ZMLX_UNROLL
    for (uint u = 0; u < PW; ++u) {
        const bool in = i0 + u < n;
        const size_t p = p0 + i0 + u;
        ZMLX_UNROLL
        for (uint t = 0; t < R / 32; ++t) {
            lv[u][t] = in ? static_cast<float>(lat[lat0 + p * R + zmlx_lane + 32 * t]) : 0.0f;
        }
        ZMLX_UNROLL
        for (uint t = 0; t < RD / 32; ++t) {
            kv[u][t] = in ? static_cast<float>(kpe[kpe0 + p * RD + zmlx_lane + 32 * t]) : 0.0f;
        }
    }
    for (uint h = 0; h < H; ++h) {
        const size_t qh = size_t(b) * H + h;
        float a[PW];
        float e[PW];
        ZMLX_UNROLL
        for (uint u = 0; u < PW; ++u) a[u] = e[u] = 0.0f;
        ZMLX_UNROLL
        for (uint t = 0; t < R / 32; ++t) {
            const float qq = qv[qh * R + zmlx_lane + 32 * t];
            ZMLX_UNROLL
            for (uint u = 0; u < PW; ++u) a[u] += qq * lv[u][t];
        }
        ZMLX_UNROLL
        for (uint t = 0; t < RD / 32; ++t) {
            const float pp = static_cast<float>(q_pe[qh * RD + zmlx_lane + 32 * t]);
            ZMLX_UNROLL
            for (uint u = 0; u < PW; ++u) e[u] += pp * kv[u][t];
        }
        ZMLX_UNROLL
        for (uint u = 0; u < PW; ++u) {
            float sv = scale * a[u] + e[u];  // this lane's share of the score
            ZMLX_WARP_SUM(sv);
            if (zmlx_lane == 0 && i0 + u < n) sc[h * CH + i0 + u] = sv;
        }
    }
}
ZMLX_BARRIER;
// 2. per head: the chunk's max, exponentials and their sum
for (uint h = zmlx_warp; h < H; h += NT / 32) {
    float mx_ = -3.0e38f;
    for (uint i = zmlx_lane; i < n; i += 32) mx_ = ZMLX_FMAX(mx_, sc[h * CH + i]);
    ZMLX_WARP_MAX(mx_);
    float sum = 0.0f;
    for (uint i = zmlx_lane; i < n; i += 32) {
        const float e = ZMLX_EXP(sc[h * CH + i] - mx_);
        sc[h * CH + i] = e;
        sum += e;
    }
    ZMLX_WARP_SUM(sum);
    if (zmlx_lane == 0) {
        m[(size_t(b) * NC + c) * H + h] = mx_;
        l[(size_t(b) * NC + c) * H + h] = sum;
    }
}
ZMLX_BARRIER;
// 3. the exp-weighted sum of the chunk's latent rows, every head at once
for (uint d = zmlx_lid; d < R; d += NT) {
    float acc[H];
    ZMLX_UNROLL
    for (uint h = 0; h < H; ++h) acc[h] = 0.0f;
    for (uint i = 0; i < n; ++i) {
        const float v = static_cast<float>(lat[lat0 + (p0 + i) * R + d]);
        ZMLX_UNROLL
        for (uint h = 0; h < H; ++h) acc[h] += sc[h * CH + i] * v;
    }
    ZMLX_UNROLL
    for (uint h = 0; h < H; ++h) o[((size_t(b) * NC + c) * H + h) * R + d] = acc[h];
}
"""


def decode_launch(backend, qv, q_pe, lat, kpe, length, *, scale) -> Launch | str:
    if qv.dtype != mx.float32 or qv.ndim != 3:
        return f"qv {qv.shape} {qv.dtype}: float32 (B, H, R) needed"
    bsz, heads, r = qv.shape
    if lat.dtype not in _DTYPES or kpe.dtype != lat.dtype or q_pe.dtype != lat.dtype:
        return f"latent {lat.dtype}, k_pe {kpe.dtype}, q_pe {q_pe.dtype}: one float dtype needed"
    if lat.ndim != 4 or lat.shape[:2] != (bsz, 1) or lat.shape[-1] != r or kpe.shape[:3] != lat.shape[:3]:
        return f"cache buffers {lat.shape} / {kpe.shape} for qv {qv.shape}"
    rd = kpe.shape[-1]
    if q_pe.shape != (bsz, heads, 1, rd):
        return f"q_pe {q_pe.shape} for {heads} heads of {rd}"
    if r % 32 or rd % 32 or r > 2048 or heads * CHUNK > 4096 or heads > 128:
        return f"latent {r}, rope {rd} (multiples of 32 needed), {heads} heads"
    if not isinstance(length, int) or not 0 < length <= lat.shape[2]:
        return f"length {length!r} for a cache of {lat.shape[2]}"
    c = math.ceil(length / CHUNK)
    return Launch(
        inputs=[qv, q_pe, lat, kpe, mx.array([length, lat.shape[2]], dtype=mx.int32)],
        template=[("H", heads), ("R", r), ("RD", rd), ("CH", CHUNK), ("NT", THREADS), ("PW", 4),
                  ("SCALE_BITS", float_bits(scale))],
        grid=(bsz * c * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(bsz, c, heads, r), (bsz, c, heads), (bsz, c, heads)],
        output_dtypes=[mx.float32] * 3,
    )


def _decode_example():
    qv = mx.random.normal((1, 3, 64), key=mx.random.key(53))
    q_pe = mx.random.normal((1, 3, 1, 32), key=mx.random.key(54)).astype(mx.bfloat16)
    lat = mx.random.normal((1, 1, 256, 64), key=mx.random.key(55)).astype(mx.bfloat16)
    kpe = mx.random.normal((1, 1, 256, 32), key=mx.random.key(56)).astype(mx.bfloat16)
    return (qv, q_pe, lat, kpe, 150), {"scale": 0.125}


mla_decode = KernelDef(
    name="mla_decode",
    reference=decode_reference,
    fidelity="close",
    reference_is_stock=False,  # a float32 computation, not mlx-lm's bf16 op sequence
    tolerance=1e-4,
    body=DECODE_BODY,
    header=HEADER,
    input_names=("qv", "q_pe", "lat", "kpe", "dims"),
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


UNEMBED_BODY = """
// One threadgroup per (b, h): the chunks combined once, in parallel, then every row.
const uint NC = dims[0];
const uint h = zmlx_gid % H;
const uint b = zmlx_gid / H;
ZMLX_SHARED float xs[R];
ZMLX_SHARED float wts[NT];
ZMLX_SHARED float red[NT / 32];
// 1. the largest chunk max (threadgroup reduction)
float mmax = -3.0e38f;
for (uint c = zmlx_lid; c < NC; c += NT) mmax = ZMLX_FMAX(mmax, m[(size_t(b) * NC + c) * H + h]);
ZMLX_WARP_MAX(mmax);
if (zmlx_lane == 0) red[zmlx_warp] = mmax;
ZMLX_BARRIER;
mmax = red[0];
for (uint w = 1; w < NT / 32; ++w) mmax = ZMLX_FMAX(mmax, red[w]);
ZMLX_BARRIER;
// 2. the softmax denominator: sum over chunks of exp(m_c - max) * l_c
float den = 0.0f;
for (uint c = zmlx_lid; c < NC; c += NT) {
    const size_t i = (size_t(b) * NC + c) * H + h;
    den += ZMLX_EXP(m[i] - mmax) * l[i];
}
ZMLX_WARP_SUM(den);
if (zmlx_lane == 0) red[zmlx_warp] = den;
ZMLX_BARRIER;
den = 0.0f;
for (uint w = 0; w < NT / 32; ++w) den += red[w];
// 3. the weighted latent: tiles of NT chunks, their weights in threadgroup memory
float xa[(R + NT - 1) / NT];
for (uint t = 0; t < (R + NT - 1) / NT; ++t) xa[t] = 0.0f;
for (uint c0 = 0; c0 < NC; c0 += NT) {
    ZMLX_BARRIER;  // the previous tile's weights are used up
    const uint c = c0 + zmlx_lid;
    wts[zmlx_lid] = c < NC ? ZMLX_EXP(m[(size_t(b) * NC + c) * H + h] - mmax) : 0.0f;
    ZMLX_BARRIER;
    const uint nt = NC - c0 < uint(NT) ? NC - c0 : uint(NT);
    ZMLX_UNROLL8  // independent loads in flight: this loop is latency-bound otherwise
    for (uint j = 0; j < nt; ++j) {
        const float a = wts[j];
        const size_t base = ((size_t(b) * NC + c0 + j) * H + h) * R;
        ZMLX_UNROLL
        for (uint t = 0; t < (R + NT - 1) / NT; ++t) {
            const uint d = zmlx_lid + NT * t;
            if (d < R) xa[t] += a * o[base + d];
        }
    }
}
for (uint t = 0; t < (R + NT - 1) / NT; ++t) {
    const uint d = zmlx_lid + NT * t;
    if (d < R) xs[d] = xa[t] / den;
}
ZMLX_BARRIER;
// 4. unembed_out: one warp per output row
for (uint j = zmlx_warp; j < V; j += NT / 32) {
    const size_t row = size_t(h) * V + j;
    float acc = 0.0f;
    for (uint k = zmlx_lane; k < R; k += 32) acc += zmlx_mla_w<BITS, GS, R>(w, s, bi, row, k) * xs[k];
    ZMLX_WARP_SUM(acc);
    if (zmlx_lane == 0) out[(size_t(b) * H + h) * V + j] = static_cast<T>(acc);
}
"""


def unembed_launch(backend, o, m, lsum, w, s, b, *, dtype, group_size, bits) -> Launch | str:
    if o.dtype != mx.float32 or o.ndim != 4 or m.shape != o.shape[:3] or lsum.shape != m.shape:
        return f"partials o {o.shape}, m {m.shape}, l {lsum.shape}"
    bsz, _, heads, r = o.shape
    if dtype not in _DTYPES:
        return f"output dtype {dtype}"
    if r > 4096 or w.ndim != 3 or w.shape[0] != heads:
        return f"unembed_out weights {w.shape} for {heads} heads of latent {r}"
    if (why := weights_reason(w, s, b, cols=r, group_size=group_size, bits=bits, dtype=dtype)):
        return f"unembed_out: {why}"
    v = w.shape[1]
    gs, nbits = packing(r, group_size, bits)
    placeholder = mx.zeros((1,), dtype)
    return Launch(
        inputs=[o, m, lsum, w, or_placeholder(s, placeholder), or_placeholder(b, placeholder),
                mx.array([o.shape[1]], dtype=mx.int32)],
        template=[("T", dtype), ("H", heads), ("R", r), ("V", v), ("NT", THREADS), ("GS", gs),
                  ("BITS", nbits)],
        grid=(bsz * heads * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
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
    body=UNEMBED_BODY,
    header=HEADER,
    input_names=("o", "m", "l", "w", "s", "bi", "dims"),
    output_names=("out",),
    launch=unembed_launch,
    example=_unembed_example,
)
