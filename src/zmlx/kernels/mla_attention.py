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
reads it waits for its page to migrate (the first restructured mla_decode lost 20-150 µs
per call to that; see HANDOFF). Fidelity `close`: each kernel is
checked against a float32 reference (its tolerance below); stock itself rounds to bf16
at every step, so the result is nearer float32 than stock is, but not stock's bits.
"""

from __future__ import annotations

import math

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, float_bits
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

HEADER = """
#ifdef ZMLX_CUDA
#define ZMLX_FN __device__ __forceinline__
#define ZMLX_THREAD
#define ZMLX_UNROLL _Pragma("unroll")
#define ZMLX_UNROLL8 _Pragma("unroll 8")
#define ZMLX_EXP(v) expf(v)
#define ZMLX_FMAX(a, b) fmaxf((a), (b))
#else
#define ZMLX_FN inline
#define ZMLX_THREAD thread
#define ZMLX_UNROLL
#define ZMLX_UNROLL8
#define ZMLX_EXP(v) metal::exp(v)
#define ZMLX_FMAX(a, b) metal::max((a), (b))
#endif
#define ZMLX_WARP_SUM(v) for (uint zmlx_m = 16; zmlx_m > 0; zmlx_m /= 2) (v) += ZMLX_SHFL_XOR((v), zmlx_m)

// mla_decode's chunk size for a context of S positions (chunk_size in Python): MINCH, grown
// in steps of CS so that there are at most TARGET chunks.
template <int MINCH, int TARGET, int CS>
ZMLX_FN uint zmlx_mla_chunk(uint S) {
    const uint ch = CS * ((S + CS * TARGET - 1) / (CS * TARGET));
    return ch > uint(MINCH) ? ch : uint(MINCH);
}

// N = 4 or 2 consecutive values from p as floats: one vector load on CUDA (p aligned to N
// elements), N loads on Metal.
#ifdef ZMLX_CUDA
ZMLX_FN void zmlx_mla_load4(const float* p, float* v) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
}
ZMLX_FN void zmlx_mla_load2(const float* p, float* v) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    v[0] = f.x; v[1] = f.y;
}
ZMLX_FN void zmlx_mla_load4(const __nv_bfloat16* p, float* v) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    v[0] = __uint_as_float(w.x << 16); v[1] = __uint_as_float(w.x & 0xffff0000u);
    v[2] = __uint_as_float(w.y << 16); v[3] = __uint_as_float(w.y & 0xffff0000u);
}
ZMLX_FN void zmlx_mla_load2(const __nv_bfloat16* p, float* v) {
    const uint w = *reinterpret_cast<const uint*>(p);
    v[0] = __uint_as_float(w << 16); v[1] = __uint_as_float(w & 0xffff0000u);
}
ZMLX_FN void zmlx_mla_load4(const __half* p, float* v) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&w.x));
    const float2 c = __half22float2(*reinterpret_cast<const __half2*>(&w.y));
    v[0] = a.x; v[1] = a.y; v[2] = c.x; v[3] = c.y;
}
ZMLX_FN void zmlx_mla_load2(const __half* p, float* v) {
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(p));
    v[0] = a.x; v[1] = a.y;
}
#else
template <typename T>
inline void zmlx_mla_load4(const device T* p, thread float* v) {
    for (uint i = 0; i < 4; ++i) v[i] = static_cast<float>(p[i]);
}
template <typename T>
inline void zmlx_mla_load2(const device T* p, thread float* v) {
    for (uint i = 0; i < 2; ++i) v[i] = static_cast<float>(p[i]);
}
#endif

// One unit of a row's dot product with x (this lane's share): affine 4/8-bit, a packed word
// of UV = 32 / BITS values (one scale and bias per group of GS; xsum = the unit's x sum,
// which the bias multiplies), or unquantized (BITS = 32, w of type W), 4 values.
template <int BITS, int GS, int K, typename S>
ZMLX_FN float zmlx_mla_unit(const ZMLX_DEVICE uint* w, const ZMLX_DEVICE S* s, const ZMLX_DEVICE S* b,
                            size_t row, uint u, const ZMLX_THREAD float* x, float xsum) {
    constexpr uint UV = 32 / BITS;
    const uint word = w[row * (K / UV) + u];
    float qx = 0.0f;
    ZMLX_UNROLL
    for (uint j = 0; j < UV; ++j) qx += static_cast<float>((word >> (BITS * j)) & ((1u << BITS) - 1u)) * x[j];
    const size_t g = row * (K / GS) + (u * UV) / GS;
    return static_cast<float>(s[g]) * qx + static_cast<float>(b[g]) * xsum;
}
template <int BITS, int GS, int K, typename S, typename W>
ZMLX_FN float zmlx_mla_unit(const ZMLX_DEVICE W* w, const ZMLX_DEVICE S*, const ZMLX_DEVICE S*,
                            size_t row, uint u, const ZMLX_THREAD float* x, float) {
    float wv[4];
    zmlx_mla_load4(w + row * K + u * 4, wv);
    return wv[0] * x[0] + wv[1] * x[1] + wv[2] * x[2] + wv[3] * x[3];
}
// RW rows' dot products with a vector x of K values (warp sums: every lane gets them), rows
// row0 .. row0 + RW - 1 of a stack of K-wide rows, those from row `nrows` on skipped (0).
// The lane holds x in registers as units (zmlx_mla_unit): unit u = lane + 32 i (i < NI)
// covers values u * UV .. u * UV + UV - 1.
template <int BITS, int GS, int K, int RW, typename S, typename W>
ZMLX_FN void zmlx_mla_rows(const ZMLX_DEVICE W* w, const ZMLX_DEVICE S* s, const ZMLX_DEVICE S* b,
                           size_t row0, uint nrows, uint lane, const ZMLX_THREAD float* x,
                           const ZMLX_THREAD float* xsum, ZMLX_THREAD float* acc) {
    constexpr uint UV = BITS == 32 ? 4 : 32 / BITS;
    constexpr uint NU = K / UV;
    constexpr uint NI = (NU + 31) / 32;
    ZMLX_UNROLL
    for (uint r = 0; r < RW; ++r) acc[r] = 0.0f;
    ZMLX_UNROLL
    for (uint i = 0; i < NI; ++i) {
        const uint u = lane + 32 * i;
        if (u < NU) {
            ZMLX_UNROLL
            for (uint r = 0; r < RW; ++r) {
                if (r < nrows) {
                    acc[r] += zmlx_mla_unit<BITS, GS, K>(w, s, b, row0 + r, u, x + i * UV, xsum[i]);
                }
            }
        }
    }
    ZMLX_UNROLL
    for (uint r = 0; r < RW; ++r) ZMLX_WARP_SUM(acc[r]);
}
#ifdef ZMLX_CUDA
ZMLX_FN void zmlx_mma_bf16(float* c, const uint* a, const uint* b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
ZMLX_FN uint zmlx_movmatrix_t(uint a) {  // the transpose of an 8x8 b16 fragment
    uint d;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a));
    return d;
}
// The A fragments of positions t0 .. t0 + 15 of a chunk (rows past its n positions repeat
// its last one, weight 0): the warp's 64 latent dims (4 k-steps of 16) and, if `rope`, its
// rope k-step.
template <int R, int RD, typename TT>
ZMLX_FN void zmlx_mla_fragments(const TT* latb, const TT* kpeb, uint p0, uint n, uint t0, uint g, bool rope,
                                uint (&la)[4][4], uint (&ka)[4]) {
    const size_t r0 = p0 + (t0 + g < n ? t0 + g : n - 1);
    const size_t r1 = p0 + (t0 + g + 8 < n ? t0 + g + 8 : n - 1);
    ZMLX_UNROLL
    for (uint ks = 0; ks < 4; ++ks) {
        la[ks][0] = *reinterpret_cast<const uint*>(latb + r0 * R + 16 * ks);
        la[ks][1] = *reinterpret_cast<const uint*>(latb + r1 * R + 16 * ks);
        la[ks][2] = *reinterpret_cast<const uint*>(latb + r0 * R + 16 * ks + 8);
        la[ks][3] = *reinterpret_cast<const uint*>(latb + r1 * R + 16 * ks + 8);
    }
    ka[0] = ka[1] = ka[2] = ka[3] = 0u;
    if (rope) {
        ka[0] = *reinterpret_cast<const uint*>(kpeb + r0 * RD);
        ka[1] = *reinterpret_cast<const uint*>(kpeb + r1 * RD);
        ka[2] = *reinterpret_cast<const uint*>(kpeb + r0 * RD + 8);
        ka[3] = *reinterpret_cast<const uint*>(kpeb + r1 * RD + 8);
    }
}
// Tensor-core path (CUDA, bf16 cache): one threadgroup of R / 64 warps per (b, chunk), warp
// w owning latent dims 64 w .. 64 w + 63, 16 positions per step. Scores S[p][h] =
// L[p][d] Q^T[d][h] by mma.m16n8k16 (A = the latent rows as loaded, B = scale * qv split
// into bf16 hi + lo, so the product keeps ~16 mantissa bits; the rope part by warps
// 0 .. RD / 16 - 1), the warps' partial scores summed in threadgroup memory, an online
// softmax one warp per head, then O^T[d][h] += L^T[d][p] P^T[p][h] (A = the same latent
// fragments transposed in registers by movmatrix, B = P split into bf16 hi + lo).
// Instantiated only for bf16 (MMA = 1); TT is a template so other dtypes compile.
template <int H, int R, int RD, typename TT>
__device__ void zmlx_mla_decode_mma(const float* qv, const TT* q_pe, const TT* lat, const TT* kpe,
                                    uint S, uint CH, float scale, float* o, float* m, float* l,
                                    uint gid, uint lid, uint lane, uint warp) {
    constexpr uint NW = R / 64;
    constexpr uint NT8 = (H + 7) / 8;  // head tiles of 8
    constexpr uint HP = NT8 * 8;
    constexpr uint RK = RD / 16;  // rope k-steps
    __shared__ float red[NW][16][HP];
    __shared__ float sp[HP][17];
    __shared__ float ms[HP];
    __shared__ float ls[HP];
    __shared__ float al[HP];
    __shared__ float ost[NW][8][68];
    const uint NC = (S + CH - 1) / CH;
    const uint c = gid % NC;
    const uint b = gid / NC;
    const uint p0 = c * CH;
    const uint n = S - p0 < CH ? S - p0 : CH;
    const uint g = lane / 4;
    const uint tg = lane % 4;
    const uint w = warp;
    const TT* latb = lat + size_t(b) * S * R + 64 * w + 2 * tg;
    const TT* kpeb = kpe + size_t(b) * S * RD + 16 * w + 2 * tg;
    uint qh[4][NT8][2];
    uint ql[4][NT8][2];
    uint qr[NT8][2];
    ZMLX_UNROLL
    for (uint nt = 0; nt < NT8; ++nt) {
        const uint h = 8 * nt + g;
        ZMLX_UNROLL
        for (uint r = 0; r < 2; ++r) {
            ZMLX_UNROLL
            for (uint ks = 0; ks < 4; ++ks) {
                const uint k = 64 * w + 16 * ks + 8 * r + 2 * tg;
                float2 x = make_float2(0.0f, 0.0f);
                if (h < H) x = *reinterpret_cast<const float2*>(qv + (size_t(b) * H + h) * R + k);
                const float x0 = scale * x.x;
                const float x1 = scale * x.y;
                const __nv_bfloat162 hi = __floats2bfloat162_rn(x0, x1);
                const __nv_bfloat162 lo = __floats2bfloat162_rn(x0 - __low2float(hi), x1 - __high2float(hi));
                qh[ks][nt][r] = *reinterpret_cast<const uint*>(&hi);
                ql[ks][nt][r] = *reinterpret_cast<const uint*>(&lo);
            }
            qr[nt][r] = 0u;
            if (w < RK && h < H) {
                const TT* qp = q_pe + (size_t(b) * H + h) * RD + 16 * w + 8 * r + 2 * tg;
                qr[nt][r] = *reinterpret_cast<const uint*>(qp);
            }
        }
    }
    if (lid < HP) {
        ms[lid] = -3.0e38f;
        ls[lid] = 0.0f;
        al[lid] = 1.0f;
    }
    float acc[4][NT8][4];
    ZMLX_UNROLL
    for (uint mt = 0; mt < 4; ++mt) {
        ZMLX_UNROLL
        for (uint nt = 0; nt < NT8; ++nt) {
            ZMLX_UNROLL
            for (uint e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
        }
    }
    __syncthreads();
    // the latent (and rope) fragments of the next 16 positions load while this step computes
    uint la[4][4];
    uint ka[4];
    zmlx_mla_fragments<R, RD>(latb, kpeb, p0, n, 0, g, w < RK, la, ka);
    for (uint t0 = 0; t0 < n; t0 += 16) {
        uint nla[4][4];
        uint nka[4];
        if (t0 + 16 < n) zmlx_mla_fragments<R, RD>(latb, kpeb, p0, n, t0 + 16, g, w < RK, nla, nka);
        float sc[NT8][4];
        ZMLX_UNROLL
        for (uint nt = 0; nt < NT8; ++nt) {
            ZMLX_UNROLL
            for (uint e = 0; e < 4; ++e) sc[nt][e] = 0.0f;
            ZMLX_UNROLL
            for (uint ks = 0; ks < 4; ++ks) {
                zmlx_mma_bf16(sc[nt], la[ks], qh[ks][nt]);
                zmlx_mma_bf16(sc[nt], la[ks], ql[ks][nt]);
            }
        }
        if (w < RK) {
            ZMLX_UNROLL
            for (uint nt = 0; nt < NT8; ++nt) zmlx_mma_bf16(sc[nt], ka, qr[nt]);
        }
        ZMLX_UNROLL
        for (uint nt = 0; nt < NT8; ++nt) {
            red[w][g][8 * nt + 2 * tg] = sc[nt][0];
            red[w][g][8 * nt + 2 * tg + 1] = sc[nt][1];
            red[w][g + 8][8 * nt + 2 * tg] = sc[nt][2];
            red[w][g + 8][8 * nt + 2 * tg + 1] = sc[nt][3];
        }
        __syncthreads();
        for (uint i = lid; i < 16 * HP; i += NW * 32) {
            const uint p = i / HP;
            const uint h = i % HP;
            float v = 0.0f;
            ZMLX_UNROLL
            for (uint ww = 0; ww < NW; ++ww) v += red[ww][p][h];
            sp[h][p] = t0 + p < n ? v : -3.0e38f;
        }
        __syncthreads();
        for (uint h = w; h < H; h += NW) {  // lanes 16..31 mirror lanes 0..15
            const uint p = lane % 16;
            const float s = sp[h][p];
            float tmax = s;
            ZMLX_UNROLL
            for (uint mk = 8; mk > 0; mk /= 2) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, mk));
            const float mold = ms[h];
            const float mnew = fmaxf(mold, tmax);
            const float e = expf(s - mnew);
            float sum = e;
            ZMLX_UNROLL
            for (uint mk = 8; mk > 0; mk /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, mk);
            __syncwarp();
            if (lane < 16) sp[h][p] = e;
            if (lane == 0) {
                const float a = expf(mold - mnew);
                al[h] = a;
                ls[h] = ls[h] * a + sum;
                ms[h] = mnew;
            }
        }
        __syncthreads();
        uint ph[NT8][2];
        uint pl[NT8][2];
        ZMLX_UNROLL
        for (uint nt = 0; nt < NT8; ++nt) {
            const float a0 = al[8 * nt + 2 * tg];
            const float a1 = al[8 * nt + 2 * tg + 1];
            ZMLX_UNROLL
            for (uint mt = 0; mt < 4; ++mt) {
                acc[mt][nt][0] *= a0;
                acc[mt][nt][1] *= a1;
                acc[mt][nt][2] *= a0;
                acc[mt][nt][3] *= a1;
            }
            ZMLX_UNROLL
            for (uint r = 0; r < 2; ++r) {
                const float x0 = sp[8 * nt + g][8 * r + 2 * tg];
                const float x1 = sp[8 * nt + g][8 * r + 2 * tg + 1];
                const __nv_bfloat162 hi = __floats2bfloat162_rn(x0, x1);
                const __nv_bfloat162 lo = __floats2bfloat162_rn(x0 - __low2float(hi), x1 - __high2float(hi));
                ph[nt][r] = *reinterpret_cast<const uint*>(&hi);
                pl[nt][r] = *reinterpret_cast<const uint*>(&lo);
            }
        }
        ZMLX_UNROLL
        for (uint mt = 0; mt < 4; ++mt) {
            uint at[4];
            at[0] = zmlx_movmatrix_t(la[mt][0]);
            at[1] = zmlx_movmatrix_t(la[mt][2]);
            at[2] = zmlx_movmatrix_t(la[mt][1]);
            at[3] = zmlx_movmatrix_t(la[mt][3]);
            ZMLX_UNROLL
            for (uint nt = 0; nt < NT8; ++nt) {
                zmlx_mma_bf16(acc[mt][nt], at, ph[nt]);
                zmlx_mma_bf16(acc[mt][nt], at, pl[nt]);
            }
        }
        ZMLX_UNROLL
        for (uint ks = 0; ks < 4; ++ks) {
            ZMLX_UNROLL
            for (uint e = 0; e < 4; ++e) la[ks][e] = nla[ks][e];
        }
        ZMLX_UNROLL
        for (uint e = 0; e < 4; ++e) ka[e] = nka[e];
    }
    // o: each warp's 8 heads x 64 dims at a time through threadgroup memory (rows of 68
    // floats: conflict-free writes), then float4 stores, two rows per warp instruction
    ZMLX_UNROLL
    for (uint nt = 0; nt < NT8; ++nt) {
        ZMLX_UNROLL
        for (uint mt = 0; mt < 4; ++mt) {
            ZMLX_UNROLL
            for (uint e = 0; e < 2; ++e) {
                ost[w][2 * tg + e][16 * mt + g] = acc[mt][nt][e];
                ost[w][2 * tg + e][16 * mt + g + 8] = acc[mt][nt][2 + e];
            }
        }
        __syncwarp();
        ZMLX_UNROLL
        for (uint i = 0; i < 4; ++i) {
            const uint hl = 2 * i + lane / 16;
            const uint h = 8 * nt + hl;
            const uint d4 = 4 * (lane % 16);
            if (h < H) {
                const float4 v = make_float4(ost[w][hl][d4], ost[w][hl][d4 + 1], ost[w][hl][d4 + 2],
                                             ost[w][hl][d4 + 3]);
                *reinterpret_cast<float4*>(o + ((size_t(b) * NC + c) * H + h) * R + 64 * w + d4) = v;
            }
        }
        __syncwarp();
    }
    if (lid < H) {
        m[(size_t(b) * NC + c) * H + lid] = ms[lid];
        l[(size_t(b) * NC + c) * H + lid] = ls[lid];
    }
}
#endif
// The x registers of zmlx_mla_rows from K values in threadgroup memory (a macro: threadgroup
// arrays cannot be passed to functions portably). Declares X and XSUM.
#define ZMLX_MLA_X_UNITS(BITS_, K_, XS, X, XSUM) \\
    constexpr uint X##_UV = BITS_ == 32 ? 4 : 32 / BITS_; \\
    constexpr uint X##_NI = (K_ / X##_UV + 31) / 32; \\
    float X[X##_NI * X##_UV]; \\
    float XSUM[X##_NI]; \\
    for (uint zi = 0; zi < X##_NI; ++zi) { \\
        const uint zu = zmlx_lane + 32 * zi; \\
        XSUM[zi] = 0.0f; \\
        for (uint zj = 0; zj < X##_UV; ++zj) { \\
            X[zi * X##_UV + zj] = zu < K_ / X##_UV ? XS[zu * X##_UV + zj] : 0.0f; \\
            XSUM[zi] += X[zi * X##_UV + zj]; \\
        } \\
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
    if nope % (4 if nbits == 32 else 32 // nbits):
        return f"nope {nope}: a whole number of packed words (or of 4 values) per row needed"
    rows = (THREADS // 32) * EMBED_RW
    blocks = q.shape[0] * heads * math.ceil(r / rows)
    return Launch(
        inputs=[q, w, or_placeholder(s, q), or_placeholder(b, q)],
        template=[("H", heads), ("QW", head_dim), ("NOPE", nope), ("R", r), ("RB", rows), ("RW", EMBED_RW),
                  ("NT", THREADS), ("GS", gs), ("BITS", nbits)],
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


def chunk_size(length: int) -> int:
    """Positions per mla_decode chunk for a context of `length`: MIN_CHUNK, grown (in steps of
    CHUNK_STEP) so that there are at most TARGET_CHUNKS chunks."""
    return max(MIN_CHUNK, CHUNK_STEP * math.ceil(length / (CHUNK_STEP * TARGET_CHUNKS)))


def _mma_fits(backend, dtype, heads, r, rd) -> bool:
    """Whether mla_decode takes its tensor-core path (CUDA, bf16 cache, GLM-like shape)."""
    return (USE_MMA and backend == "cuda" and dtype == mx.bfloat16 and r % 64 == 0 and 64 <= r <= 1024
            and rd % 16 == 0 and 0 < rd // 16 <= r // 64 and heads <= 32)


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
    scores = (scale * _dot(qv[:, :, None, :], lat[:, None])
              + _dot(q_pe[:, :, 0, None].astype(mx.float32), kpe[:, None]))  # (B, H, S)
    pad = c * ch - length
    scores = mx.pad(scores, [(0, 0), (0, 0), (0, pad)], constant_values=-mx.inf)  # (B, H, C*CH)
    scores = scores.reshape(bsz, heads, c, ch).transpose(0, 2, 1, 3)  # (B, C, H, CH)
    m = scores.max(axis=-1)
    e = mx.exp(scores - m[..., None])
    lat = mx.pad(lat, [(0, 0), (0, pad), (0, 0)]).reshape(bsz, c, ch, r)
    o = _dot(e[..., None, :], lat[:, :, None].swapaxes(-1, -2))  # (B, C, H, R)
    return o, m, e.sum(axis=-1)


DECODE_BODY = """
// One threadgroup per (b, chunk, group of WPB * HPW heads); each warp on its own: HPW heads
// over the chunk's positions, TP at a time, with an online softmax (no threadgroup memory,
// no barriers; the warps of a group share the chunk's rows through L1). A lane holds the
// latent dims d = 4 lane + 128 t + i and the rope dims e = 2 lane + 64 t + i. The context
// length S comes with the cache view's shape (a kernel argument): no per-token array.
constexpr uint RT = R / 128;
constexpr uint ET = RD / 64;
const uint S = uint(lat_shape[2]);
const uint CH = zmlx_mla_chunk<MINCH, TARGET, CS>(S);
#ifdef ZMLX_CUDA
if constexpr (MMA) {  // bf16 on CUDA: tensor cores (zmlx_mla_decode_mma)
    zmlx_mla_decode_mma<H, R, RD>(qv, q_pe, lat, kpe, S, CH, ZMLX_FLOAT_BITS(SCALE_BITS),
                                  o, m, l, zmlx_gid, zmlx_lid, zmlx_lane, zmlx_warp);
    return;
}
#endif
const uint NC = (S + CH - 1) / CH;
const uint NG = (H + HPW * WPB - 1) / (HPW * WPB);
const uint g = zmlx_gid % NG;
const uint c = (zmlx_gid / NG) % NC;
const uint b = zmlx_gid / (NG * NC);
const uint hw = (g * WPB + zmlx_warp) * HPW;  // this warp's first head
if (hw >= H) return;  // the whole warp: a last group's spare warps
const uint p0 = c * CH;
const uint n = S - p0 < CH ? S - p0 : CH;
const float scale = ZMLX_FLOAT_BITS(SCALE_BITS);
const ZMLX_DEVICE T* latb = lat + size_t(b) * S * R;
const ZMLX_DEVICE T* kpeb = kpe + size_t(b) * S * RD;
float qr[HPW][RT][4];  // scale * qv
float qe[HPW][ET][2];  // q_pe
float acc[HPW][RT][4];
float mh[HPW];
float lh[HPW];
ZMLX_UNROLL
for (uint j = 0; j < HPW; ++j) {
    const size_t qh = size_t(b) * H + (hw + j < H ? hw + j : H - 1);  // a spare head repeats the last
    ZMLX_UNROLL
    for (uint t = 0; t < RT; ++t) {
        ZMLX_UNROLL
        for (uint i = 0; i < 4; ++i) {
            qr[j][t][i] = scale * qv[qh * R + 4 * zmlx_lane + 128 * t + i];
            acc[j][t][i] = 0.0f;
        }
    }
    ZMLX_UNROLL
    for (uint t = 0; t < ET; ++t) {
        ZMLX_UNROLL
        for (uint i = 0; i < 2; ++i) {
            qe[j][t][i] = static_cast<float>(q_pe[qh * RD + 2 * zmlx_lane + 64 * t + i]);
        }
    }
    mh[j] = -3.0e38f;
    lh[j] = 0.0f;
}
for (uint i0 = 0; i0 < n; i0 += TP) {
    float lv[TP][RT][4];
    float kv[TP][ET][2];
    ZMLX_UNROLL
    for (uint u = 0; u < TP; ++u) {
        const size_t p = p0 + (i0 + u < n ? i0 + u : n - 1);  // past the chunk: its last row, weight 0
        ZMLX_UNROLL
        for (uint t = 0; t < RT; ++t) zmlx_mla_load4(latb + p * R + 4 * zmlx_lane + 128 * t, lv[u][t]);
        ZMLX_UNROLL
        for (uint t = 0; t < ET; ++t) zmlx_mla_load2(kpeb + p * RD + 2 * zmlx_lane + 64 * t, kv[u][t]);
    }
    ZMLX_UNROLL
    for (uint j = 0; j < HPW; ++j) {
        float sc[TP];
        float smax = mh[j];
        ZMLX_UNROLL
        for (uint u = 0; u < TP; ++u) {
            float a = 0.0f;
            ZMLX_UNROLL
            for (uint t = 0; t < RT; ++t) {
                ZMLX_UNROLL
                for (uint i = 0; i < 4; ++i) a += qr[j][t][i] * lv[u][t][i];
            }
            ZMLX_UNROLL
            for (uint t = 0; t < ET; ++t) {
                ZMLX_UNROLL
                for (uint i = 0; i < 2; ++i) a += qe[j][t][i] * kv[u][t][i];
            }
            ZMLX_WARP_SUM(a);
            sc[u] = i0 + u < n ? a : -3.0e38f;
            smax = ZMLX_FMAX(smax, sc[u]);
        }
        const float alpha = ZMLX_EXP(mh[j] - smax);  // 0 on the first step
        mh[j] = smax;
        float psum = 0.0f;
        ZMLX_UNROLL
        for (uint u = 0; u < TP; ++u) {
            sc[u] = ZMLX_EXP(sc[u] - smax);
            psum += sc[u];
        }
        lh[j] = lh[j] * alpha + psum;
        ZMLX_UNROLL
        for (uint t = 0; t < RT; ++t) {
            ZMLX_UNROLL
            for (uint i = 0; i < 4; ++i) {
                float v = acc[j][t][i] * alpha;
                ZMLX_UNROLL
                for (uint u = 0; u < TP; ++u) v += sc[u] * lv[u][t][i];
                acc[j][t][i] = v;
            }
        }
    }
}
ZMLX_UNROLL
for (uint j = 0; j < HPW; ++j) {
    if (hw + j < H) {
        const size_t oi = (size_t(b) * NC + c) * H + hw + j;
        ZMLX_UNROLL
        for (uint t = 0; t < RT; ++t) {
            ZMLX_UNROLL
            for (uint i = 0; i < 4; ++i) o[oi * R + 4 * zmlx_lane + 128 * t + i] = acc[j][t][i];
        }
        if (zmlx_lane == 0) {
            m[oi] = mh[j];
            l[oi] = lh[j];
        }
    }
}
"""


def decode_launch(backend, qv, q_pe, lat, kpe, *, scale) -> Launch | str:
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
    if r % 128 or rd % 64 or r > 2048 or rd > 256 or heads > 256:
        return f"latent {r}, rope {rd} (multiples of 128 and 64 needed), {heads} heads"
    length = lat.shape[2]
    if not 0 < length < 2**31 // max(r, 1):
        return f"{length} positions"
    ch = chunk_size(length)
    c = math.ceil(length / ch)
    mma = _mma_fits(backend, lat.dtype, heads, r, rd)
    hpw = min(HEADS_PER_WARP, heads)
    wpb = min(WARPS_PER_BLOCK, math.ceil(heads / hpw))
    groups = math.ceil(heads / (hpw * wpb))
    threads, blocks = ((r // 64) * 32, bsz * c) if mma else (wpb * 32, bsz * c * groups)
    return Launch(
        inputs=[qv, q_pe, lat, kpe],
        template=[("T", lat.dtype), ("H", heads), ("R", r), ("RD", rd), ("MMA", int(mma)), ("HPW", hpw),
                  ("WPB", wpb), ("TP", TP), ("MINCH", MIN_CHUNK), ("CS", CHUNK_STEP),
                  ("TARGET", TARGET_CHUNKS), ("SCALE_BITS", float_bits(scale))],
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
    body=DECODE_BODY,
    header=HEADER,
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


UNEMBED_BODY = """
// One threadgroup per (b, h): the chunks combined once, in parallel, then every row.
// Thread (cl, qd) takes quad qd of chunks cl, cl + CL, ... with its own running max (no
// reduction before its loads: they are all independent), then the CL partial sums are
// rescaled to the largest max and added in threadgroup memory.
constexpr uint QD = R / 4;  // quads of latent values
constexpr uint CL = NT / QD;  // threads per quad
const uint NC = uint(o_shape[1]);
const uint h = zmlx_gid % H;
const uint b = zmlx_gid / H;
ZMLX_SHARED float xs[R];
ZMLX_SHARED float part[CL * R];
ZMLX_SHARED float pm[CL];
ZMLX_SHARED float pd[CL];
const uint qd = zmlx_lid % QD;
const uint cl = zmlx_lid / QD;
float mt = -3.0e38f;
float dl = 0.0f;
float xa[4] = {0.0f, 0.0f, 0.0f, 0.0f};
ZMLX_UNROLL8  // independent loads in flight
for (uint c = cl; c < NC; c += CL) {
    const size_t i = (size_t(b) * NC + c) * H + h;
    const float mc = m[i];
    const float lc = l[i];
    float v[4];
    zmlx_mla_load4(o + i * R + 4 * qd, v);
    const float mn = ZMLX_FMAX(mt, mc);
    const float sa = ZMLX_EXP(mt - mn);
    const float sb = ZMLX_EXP(mc - mn);
    dl = dl * sa + lc * sb;
    ZMLX_UNROLL
    for (uint k = 0; k < 4; ++k) xa[k] = xa[k] * sa + v[k] * sb;
    mt = mn;
}
ZMLX_UNROLL
for (uint k = 0; k < 4; ++k) part[cl * R + 4 * qd + k] = xa[k];
if (qd == 0) {
    pm[cl] = mt;
    pd[cl] = dl;
}
ZMLX_BARRIER;
float mmax = pm[0];
for (uint k = 1; k < CL; ++k) mmax = ZMLX_FMAX(mmax, pm[k]);
float den = 0.0f;
for (uint k = 0; k < CL; ++k) den += ZMLX_EXP(pm[k] - mmax) * pd[k];
for (uint d = zmlx_lid; d < R; d += NT) {
    float sum = 0.0f;
    for (uint k = 0; k < CL; ++k) sum += ZMLX_EXP(pm[k] - mmax) * part[k * R + d];
    xs[d] = sum / den;
}
ZMLX_BARRIER;
// 4. unembed_out: each warp RW rows at a time
ZMLX_MLA_X_UNITS(BITS, R, xs, xr, xsum)
for (uint j0 = zmlx_warp * RW; j0 < V; j0 += (NT / 32) * RW) {
    const uint nrows = V - j0 < RW ? V - j0 : RW;
    float acc[RW];
    zmlx_mla_rows<BITS, GS, R, RW>(w, s, bi, size_t(h) * V + j0, nrows, zmlx_lane, xr, xsum, acc);
    for (uint r = 0; r < nrows; ++r) {
        if (zmlx_lane == 0) out[(size_t(b) * H + h) * V + j0 + r] = static_cast<T>(acc[r]);
    }
}
"""


def unembed_launch(backend, o, m, lsum, w, s, b, *, dtype, group_size, bits) -> Launch | str:
    if o.dtype != mx.float32 or o.ndim != 4 or m.shape != o.shape[:3] or lsum.shape != m.shape:
        return f"partials o {o.shape}, m {m.shape}, l {lsum.shape}"
    bsz, _, heads, r = o.shape
    if dtype not in _DTYPES:
        return f"output dtype {dtype}"
    threads = UNEMBED_THREADS_CUDA if backend == "cuda" else UNEMBED_THREADS
    if r <= 0 or r % 4 or threads % (r // 4) or w.ndim != 3 or w.shape[0] != heads:
        return (f"unembed_out weights {w.shape} for {heads} heads of latent {r} "
                f"(latent / 4 must divide {threads})")
    if (why := weights_reason(w, s, b, cols=r, group_size=group_size, bits=bits, dtype=dtype)):
        return f"unembed_out: {why}"
    v = w.shape[1]
    gs, nbits = packing(r, group_size, bits)
    if r % (4 if nbits == 32 else 32 // nbits):
        return f"latent {r}: a whole number of packed words per row needed"
    return Launch(  # unquantized: m stands in for the scales and biases (never read)
        inputs=[o, m, lsum, w, or_placeholder(s, m), or_placeholder(b, m)],
        template=[("T", dtype), ("H", heads), ("R", r), ("V", v), ("NT", threads), ("RW", UNEMBED_RW),
                  ("GS", gs), ("BITS", nbits)],
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
    body=UNEMBED_BODY,
    header=HEADER,
    input_names=("o", "m", "l", "w", "s", "bi"),
    output_names=("out",),
    launch=unembed_launch,
    example=_unembed_example,
)
