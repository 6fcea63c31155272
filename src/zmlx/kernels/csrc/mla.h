
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

// Where chunk c of the NC chunks of CH positions starts: at c * span. All S buffered positions
// count (SL = S: mla_decode, mla_decode_q): span = CH. Only the first SL < S count
// (mla_decode_len over a static cache's buffers): they are spread over all NC chunks, span
// the smallest multiple of 16 (an mma step) that covers them, at most CH, so the work is
// shared by every threadgroup instead of by the first SL / CH (chunk_span in Python).
ZMLX_FN uint zmlx_mla_span(uint S, uint SL, uint CH, uint NC) {
    if (SL >= S) return CH;
    const uint per = (SL + NC - 1) / NC;
    uint span = 16u * ((per + 15u) / 16u);
    span = span > 16u ? span : 16u;
    return span < CH ? span : CH;
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
// The x registers of zmlx_mla_rows from K values in threadgroup memory (a macro: threadgroup
// arrays cannot be passed to functions portably). Declares X and XSUM.
#define ZMLX_MLA_X_UNITS(BITS_, K_, XS, X, XSUM) \
    constexpr uint X##_UV = BITS_ == 32 ? 4 : 32 / BITS_; \
    constexpr uint X##_NI = (K_ / X##_UV + 31) / 32; \
    float X[X##_NI * X##_UV]; \
    float XSUM[X##_NI]; \
    for (uint zi = 0; zi < X##_NI; ++zi) { \
        const uint zu = zmlx_lane + 32 * zi; \
        XSUM[zi] = 0.0f; \
        for (uint zj = 0; zj < X##_UV; ++zj) { \
            X[zi * X##_UV + zj] = zu < K_ / X##_UV ? XS[zu * X##_UV + zj] : 0.0f; \
            XSUM[zi] += X[zi * X##_UV + zj]; \
        } \
    }
