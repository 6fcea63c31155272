// mxfp4 (MLX's layout: e2m1 values, 8 to a uint32 word, lowest nibble first; one uint8
// e8m0 scale per 32 values; no biases). Both conversions are exact, as cutlass's:
// e2m1 s.ee.m -> +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}; e8m0 e -> 2^(e - 127), e = 0 -> 2^-127, 255 NaN.
#ifdef ZMLX_CUDA
#define ZMLX_QUANT_FN __device__ inline
#else
#define ZMLX_QUANT_FN inline
#endif
ZMLX_QUANT_FN float zmlx_e2m1(uint q) {
    const uint mag = q & 7u;
    const uint bits = (mag >= 2u ? (((mag >> 1) + 126u) << 23) | ((mag & 1u) << 22) : mag * 0x3F000000u)
        | ((q & 8u) << 28);
    return ZMLX_FLOAT_BITS(int(bits));
}
ZMLX_QUANT_FN float zmlx_e8m0(uint e) {
    return ZMLX_FLOAT_BITS(int(e == 0u ? 0x00400000u : e == 255u ? 0x7fffffffu : e << 23));
}
#undef ZMLX_QUANT_FN


#ifdef ZMLX_CUDA
#include <cooperative_groups/reduce.h>
#include <cuda/std/type_traits>
#include "mlx/backend/cuda/device/binary_ops.cuh"
#include "mlx/backend/cuda/device/unary_ops.cuh"
#define ZMLX_SIMD_SUM(v) cg::reduce(cg::tiled_partition<32>(cg::this_thread_block()), (v), cg::plus<float>())

// T's arithmetic as MLX's CUDA qmv compiles it: every op one IEEE rounding in T, and the
// dequantization q * scale + bias contracted into one fma (nvcc's default -fmad).
__device__ inline float zmlx_f(float v) { return v; }
__device__ inline float zmlx_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float zmlx_f(__half v) { return __half2float(v); }
__device__ inline float zmlx_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ inline __nv_bfloat16 zmlx_fma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
    return __hfma(a, b, c);
}
__device__ inline __half zmlx_fma(__half a, __half b, __half c) { return __hfma(a, b, c); }

// N consecutive values from src into dst: as 16- or 8-byte loads when the size and src's
// alignment allow (as qmv's vector loads), else one by one. Only how values are read.
template <int N, typename T>
__device__ inline void zmlx_load(T* dst, const T* src) {
    constexpr int BYTES = N * int(sizeof(T));
    if constexpr (BYTES % 16 == 0) {
        if (reinterpret_cast<size_t>(src) % 16 == 0) {
            uint4 v[BYTES / 16];
#pragma unroll
            for (int c = 0; c < BYTES / 16; ++c) v[c] = reinterpret_cast<const uint4*>(src)[c];
            memcpy(dst, v, BYTES);
            return;
        }
    } else if constexpr (BYTES % 8 == 0) {
        if (reinterpret_cast<size_t>(src) % 8 == 0) {
            uint2 v[BYTES / 8];
#pragma unroll
            for (int c = 0; c < BYTES / 8; ++c) v[c] = reinterpret_cast<const uint2*>(src)[c];
            memcpy(dst, v, BYTES);
            return;
        }
    }
#pragma unroll
    for (int j = 0; j < N; ++j) dst[j] = src[j];
}

// A pair's halves in their own type (zmlx_qdot_lane's packed path)
__device__ inline __half zmlx_lo(__half2 a) { return __low2half(a); }
__device__ inline __half zmlx_hi(__half2 a) { return __high2half(a); }
__device__ inline __nv_bfloat16 zmlx_lo(__nv_bfloat162 a) { return __low2bfloat16(a); }
__device__ inline __nv_bfloat16 zmlx_hi(__nv_bfloat162 a) { return __high2bfloat16(a); }

template <typename T>
__device__ inline T zmlx_mul(T a, T b) { return __hmul(a, b); }
__device__ inline float zmlx_mul(float a, float b) { return __fmul_rn(a, b); }

// This lane's share of one row's dot product, in MLX's CUDA qmv order: lane l takes E
// consecutive values at l * E + r * 32 * E (then the remainder), one accumulator per
// position (in T for 4-bit narrow types, else float), summed in order into a float.
// The caller finishes with ZMLX_SIMD_SUM (cg::reduce, as qmv) and rounds to T.
// Affine rows (scales S and biases B in T) dequantize as fma(q, scale, bias) in T; mxfp4
// rows (S uint8: e8m0 scales, B a placeholder never read) as T(e2m1 value) * T(scale), as
// qmv dequantizes them on sm80/sm90 (qmv.cu, Q = float_e2m1_t, S = float_ue8m0_t, no bias;
// the product is exact but at the ends of T's range), everything else the same.
template <int BITS, int GS, int COLS, typename T, typename S, typename B>
__device__ inline float zmlx_qdot_lane(const uint* w, const S* s, const B* b, const T* x, uint lane) {
    constexpr bool MX = cuda::std::is_same_v<S, uint8_t>;
    static_assert(MX ? BITS == 4 && GS == 32 : cuda::std::is_same_v<S, T> && cuda::std::is_same_v<B, T>,
                  "affine scales and biases in T, or mxfp4 (4-bit, group 32, uint8 scales)");
    constexpr int E = (sizeof(T) <= 2 && BITS <= 4) ? 16 : 8;
    constexpr int PER_WARP = 32 * E;
    constexpr int PER_WORD = 32 / BITS;
    constexpr uint MASK = (1u << BITS) - 1u;
    constexpr bool WIDE_ACC = BITS >= 8 && !cuda::std::is_same_v<T, float>;
    using Acc = cuda::std::conditional_t<(BITS >= 8), float, T>;
    Acc acc[E];
#pragma unroll
    for (int j = 0; j < E; ++j) acc[j] = Acc(0.0f);
    constexpr int NW = E / PER_WORD;  // packed words per tile (idx is a multiple of E >= PER_WORD)
    if constexpr (BITS == 4 && !MX && sizeof(T) == 2) {
        // The same arithmetic two positions at a time: positions n and n + 4 of a word in one
        // half2 / bfloat162 (their nibbles sit 16 bits apart), each lane of HFMA2 one IEEE fma
        // rounded to T, as the scalar ops. The nibble q becomes T exactly: q's bits under the
        // exponent of 2^10 (half) or 2^7 (bf16) give 2^k + q, and subtracting 2^k is exact.
        using T2 = cuda::std::conditional_t<cuda::std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
        constexpr uint MAGIC = cuda::std::is_same_v<T, __half> ? 0x64006400u : 0x43004300u;
        const uint magic = MAGIC;
        const T2 off = *reinterpret_cast<const T2*>(&magic);
        T2 acc2[E / 2];
#pragma unroll
        for (int p = 0; p < E / 2; ++p) acc2[p] = T2(acc[0], acc[0]);  // zeros
        auto tile2 = [&](int idx) {
            const T sc = s[idx / GS], bi = b[idx / GS];
            const T2 sc2 = T2(sc, sc), bi2 = T2(bi, bi);
            T xs[E];
            uint ws[NW];
            zmlx_load<E>(xs, x + idx);
            zmlx_load<NW>(ws, w + idx / PER_WORD);
#pragma unroll
            for (int k = 0; k < NW; ++k) {
#pragma unroll
                for (int n = 0; n < 4; ++n) {
                    const uint bits = ((ws[k] >> (4 * n)) & 0x000F000Fu) | MAGIC;
                    const T2 q2 = __hsub2(*reinterpret_cast<const T2*>(&bits), off);
                    const T2 wd = __hfma2(q2, sc2, bi2);
                    acc2[k * 4 + n] = __hfma2(T2(xs[k * 8 + n], xs[k * 8 + n + 4]), wd, acc2[k * 4 + n]);
                }
            }
        };
        for (int r = 0; r < COLS / PER_WARP; ++r) tile2(int(lane) * E + r * PER_WARP);
        if constexpr (COLS % PER_WARP != 0) {
            const int idx = int(lane) * E + COLS - COLS % PER_WARP;
            if (idx < COLS) tile2(idx);
        }
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < E; ++j) {  // in position order, as the scalar sum
            const T2 a = acc2[(j / 8) * 4 + (j % 4)];
            sum += zmlx_f((j % 8) < 4 ? zmlx_lo(a) : zmlx_hi(a));
        }
        return sum;
    }
    auto tile = [&](int idx) {
        T sc, bi;
        if constexpr (MX) {
            sc = static_cast<T>(zmlx_e8m0(s[idx / GS]));
        } else {
            sc = s[idx / GS];
            bi = b[idx / GS];
        }
        T xs[E];
        uint ws[NW];
        zmlx_load<E>(xs, x + idx);
        zmlx_load<NW>(ws, w + idx / PER_WORD);
#pragma unroll
        for (int j = 0; j < E; ++j) {
            const uint q = (ws[j / PER_WORD] >> (BITS * (j % PER_WORD))) & MASK;
            T wd;
            if constexpr (MX) {
                wd = zmlx_mul(static_cast<T>(zmlx_e2m1(q)), sc);
            } else {
                wd = zmlx_fma(T(float(q)), sc, bi);
            }
            if constexpr (WIDE_ACC) {
                acc[j] = fmaf(zmlx_f(xs[j]), zmlx_f(wd), acc[j]);
            } else {
                acc[j] = zmlx_fma(xs[j], wd, acc[j]);
            }
        }
    };
    for (int r = 0; r < COLS / PER_WARP; ++r) tile(int(lane) * E + r * PER_WARP);
    if constexpr (COLS % PER_WARP != 0) {
        const int idx = int(lane) * E + COLS - COLS % PER_WARP;
        if (idx < COLS) tile(idx);
    }
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < E; ++j) sum += zmlx_f(acc[j]);
    return sum;
}

// The same for an unquantized row (BITS = 32: one T per value; s and b unused), in MLX's
// CUDA gemv order (gather_mv / gemv_single at one row): lane l takes NPT consecutive
// values at NPT * l + r * 32 * NPT into one float accumulator (fma), NPT = 4 when
// COLS % 128 == 0 and both pointers are 4-value aligned, 2 when COLS % 64 == 0 and
// 2-aligned, else 1, as MLX picks it (rows of a multiple of 64 values keep the
// alignment of the array's base, which is what MLX checks).
__device__ inline bool zmlx_aligned(const void* p, size_t bytes) {
    return reinterpret_cast<size_t>(p) % bytes == 0;
}

template <int BITS, int GS, int COLS, typename T>
__device__ inline float zmlx_qdot_lane(const T* w, const T* s, const T* b, const T* x, uint lane) {
    const int npt = (COLS % 128 == 0 && zmlx_aligned(w, 4 * sizeof(T)) && zmlx_aligned(x, 4 * sizeof(T)))
        ? 4 : (COLS % 64 == 0 && zmlx_aligned(w, 2 * sizeof(T)) && zmlx_aligned(x, 2 * sizeof(T))) ? 2 : 1;
    float sum = 0.0f;
    for (int col = npt * int(lane); col < COLS; col += 32 * npt) {
        for (int j = 0; j < npt; ++j) sum = fmaf(zmlx_f(w[col + j]), zmlx_f(x[col + j]), sum);
    }
    return sum;
}

// MLX 0.32.4's gathered mxfp4 matvec for rows wider than 512 values (`fp_gather_qmv<T, 8, 4, 4,
// 32, true>`, taken to run fp_qmv_impl as at the mirror's HEAD, fp_qmv.cu): lane l takes 4
// packed words (32 values) at word 4 l, then 128 words on; each step's products go into two
// float sums by turns (even positions, odd positions: fma), then sum = fma(x + y, scale, sum).
// The caller's ZMLX_SIMD_SUM is cg::reduce, as there. Bitwise stock in its `cuda` tests on the
// H200 (2026-12-01); used where quant.fp_order (Python) says so.
template <int COLS, typename T>
__device__ inline float zmlx_fp_qdot_lane(const uint* w, const uint8_t* s, const T* x, uint lane) {
    static_assert(COLS % 32 == 0, "whole groups of 32 values");
    constexpr int PACKED = COLS / 8;
    float sum = 0.0f;
    for (int col = 4 * int(lane); col < PACKED; col += 32 * 4) {
        T xs[32];
        uint ws[4];
        zmlx_load<32>(xs, x + 8 * col);
        zmlx_load<4>(ws, w + col);
        float lx = 0.0f, ly = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                lx = fmaf(zmlx_e2m1((ws[k] >> (4 * j)) & 15u), zmlx_f(xs[8 * k + j]), lx);
                ly = fmaf(zmlx_e2m1((ws[k] >> (4 * j + 4)) & 15u), zmlx_f(xs[8 * k + j + 1]), ly);
            }
        }
        sum = fmaf(lx + ly, zmlx_e8m0(s[col / 4]), sum);
    }
    return sum;
}

// A gathered (expert) row's dot: FP (the launch's FPQMV) picks zmlx_fp_qdot_lane's order
// (wide mxfp4 rows), else zmlx_qdot_lane's.
template <int BITS, int GS, int COLS, bool FP, typename W, typename S, typename B, typename T>
__device__ inline float zmlx_gqdot_lane(const W* w, const S* s, const B* b, const T* x, uint lane) {
    if constexpr (FP) {
        static_assert(cuda::std::is_same_v<S, uint8_t> && cuda::std::is_same_v<W, uint>, "mxfp4 rows only");
        return zmlx_fp_qdot_lane<COLS>(w, s, x, lane);
    } else {
        return zmlx_qdot_lane<BITS, GS, COLS>(w, s, b, x, lane);
    }
}

// mlx-lm's swiglu(gate, up) = silu(gate) * up as MLX's compiled CUDA kernel runs it:
// each op is MLX's own device functor, each result rounded to T.
template <typename T>
__device__ inline T zmlx_swiglu(T g, T u) {
    const T sig = mlx::core::cu::Sigmoid{}(g);
    return mlx::core::cu::Multiply{}(mlx::core::cu::Multiply{}(g, sig), u);
}
#else
#define ZMLX_SIMD_SUM(v) simd_sum(v)

// This lane's float32 share of one packed row's dot with x (lanes take words lane,
// lane + 32, ...); the caller finishes with ZMLX_SIMD_SUM. Not MLX's Metal qmv order:
// on Metal the quantized kernels are `close`, not exact.
template <int BITS, int GS, int COLS, typename TS, typename TX>
inline float zmlx_qdot_lane(const device uint* w, const device TS* s,
                            const device TS* b, const device TX* x, uint lane) {
    constexpr uint PER_WORD = 32 / BITS;
    constexpr uint WORDS = COLS / PER_WORD;
    constexpr uint MASK = (1u << BITS) - 1u;
    float acc = 0.0f;
    for (uint k = lane; k < WORDS; k += 32) {
        const uint q = w[k];
        const uint g = (k * PER_WORD) / GS;
        const float sc = static_cast<float>(s[g]), bi = static_cast<float>(b[g]);
        for (uint j = 0; j < PER_WORD; ++j) {
            const float v = static_cast<float>((q >> (BITS * j)) & MASK);
            acc += (sc * v + bi) * static_cast<float>(x[k * PER_WORD + j]);
        }
    }
    return acc;
}

// The same for an mxfp4 row (uint8 e8m0 scales; b a placeholder of another type, never
// read): each word's eight products summed, times its group's scale, in float32.
template <int BITS, int GS, int COLS, typename TB, typename TX>
inline float zmlx_qdot_lane(const device uint* w, const device uint8_t* s,
                            const device TB* b, const device TX* x, uint lane) {
    constexpr uint WORDS = COLS / 8;
    float acc = 0.0f;
    for (uint k = lane; k < WORDS; k += 32) {
        const uint q = w[k];
        float part = 0.0f;
        for (uint j = 0; j < 8; ++j) part += zmlx_e2m1(q >> (4 * j)) * static_cast<float>(x[k * 8 + j]);
        acc += zmlx_e8m0(s[(k * 8) / GS]) * part;
    }
    return acc;
}

// An unquantized row (BITS = 32; s and b unused): a plain float32 sum.
template <int BITS, int GS, int COLS, typename T>
inline float zmlx_qdot_lane(const device T* w, const device T* s, const device T* b,
                            const device T* x, uint lane) {
    float acc = 0.0f;
    for (uint k = lane; k < uint(COLS); k += 32) acc += static_cast<float>(w[k]) * static_cast<float>(x[k]);
    return acc;
}

// A gathered row's dot (CUDA picks an order by FP; Metal's sums are float32 either way).
template <int BITS, int GS, int COLS, bool FP, typename W, typename S, typename B, typename T>
inline float zmlx_gqdot_lane(const device W* w, const device S* s, const device B* b, const device T* x,
                             uint lane) {
    return zmlx_qdot_lane<BITS, GS, COLS>(w, s, b, x, lane);
}

// swiglu with mlx-lm's roundings: sigmoid, silu and the product each rounded to T.
template <typename T>
inline T zmlx_swiglu(T g, T u) {
    const float gt = static_cast<float>(g);
    const float sig = static_cast<float>(static_cast<T>(1.0f / (1.0f + metal::exp(-gt))));
    const float silu = static_cast<float>(static_cast<T>(gt * sig));
    return static_cast<T>(silu * static_cast<float>(u));
}
#endif
