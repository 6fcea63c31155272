#ifdef ZMLX_CUDA
// MLX's qmm_sm80 order (mlx/backend/cuda/device/qmm_sm80.cuh and cute_dequant.cuh at v0.32.1),
// the kernel stock's quantized matmul runs on CUDA where rows x batches >= 8 (gather_qmm of
// 8 experts at decode, MultiLinear's embed_q / unembed_out over the heads), per output element:
// - each weight dequantized to T = bf16 or half (the activations' and scales' type) from
//   q * scale + bias in float, rounded once (measured: see zmlx_qmm_wpair);
// - mma.sync m16n8k16 with float accumulators over the k-blocks of 16 in ascending order from
//   k = 0 (the mainloop's tiles, then its blocks; no split-k), starting from 0;
// - the sum rounded to T once (the epilogue).
// One element's value depends only on its A row, its B column and its accumulator, so the same
// instruction on the same operands in the same k-slots gives the same bits whatever the tiling:
// one warp computes 8 outputs of one activation row (A's rows 1-15 zero). A probe of this
// claim: benchmarks/gpu/qmm_order_probe.py (run on the H200 with the one-rounding weights: NOTEBOOK).
#define ZMLX_QMM_FN __device__ __forceinline__
template <typename T>
struct zmlx_qmm_t;
template <>
struct zmlx_qmm_t<__nv_bfloat16> {
    static ZMLX_QMM_FN uint pack(float a, float b) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<const uint*>(&v);
    }
    static ZMLX_QMM_FN void mma(float (&c)[4], const uint (&a)[4], const uint (&b)[2]) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};
template <>
struct zmlx_qmm_t<__half> {
    static ZMLX_QMM_FN uint pack(float a, float b) {
        const __half2 v = __floats2half2_rn(a, b);
        return *reinterpret_cast<const uint*>(&v);
    }
    static ZMLX_QMM_FN void mma(float (&c)[4], const uint (&a)[4], const uint (&b)[2]) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};
// Weights k, k + 1 (k even: one packed word, one group) of a row, dequantized as above, as the
// B fragment register's pair: q * scale + bias in float (q * scale is exact: q has at most 8
// bits, the scale 11), rounded to T once. The H200 showed it (qmm_order_probe's exact sums):
// stock's weights are T(q * s + b), not T(T(q * s) + b) as cute_vectorized_dequant reads.
template <int BITS, int GS, typename T>
ZMLX_QMM_FN uint zmlx_qmm_wpair(const uint* wr, const T* sr, const T* br, uint k) {
    constexpr uint UV = 32 / BITS;
    constexpr uint MASK = (1u << BITS) - 1u;
    const uint word = wr[k / UV];
    const uint sh = BITS * (k % UV);
    const float sc = static_cast<float>(sr[k / GS]);
    const float bi = static_cast<float>(br[k / GS]);
    const float w0 = __fmaf_rn(static_cast<float>((word >> sh) & MASK), sc, bi);
    const float w1 = __fmaf_rn(static_cast<float>((word >> (sh + BITS)) & MASK), sc, bi);
    return zmlx_qmm_t<T>::pack(w0, w1);
}
// Outputs n0 .. n0 + 7 of activation row x (K values of T) against rows n0 .. n0 + 7 of the
// packed weights (wr: K / (32 / BITS) words a row; sr, br: K / GS a row), in qmm_sm80's order.
// After the call lanes 0-3 (g = 0) hold outputs n0 + 2 lane and n0 + 2 lane + 1 in c[0], c[1]
// (float; the caller rounds them to T). Every lane of the warp must call it.
template <int BITS, int GS, int K, typename T>
ZMLX_QMM_FN void zmlx_qmm_row8(const T* x, const uint* w, const T* s, const T* b, uint n0, uint lane, float (&c)[4]) {
    constexpr uint UV = 32 / BITS;
    const uint g = lane / 4;
    const uint t = lane % 4;
    const uint* wr = w + size_t(n0 + g) * (K / UV);
    const T* sr = s + size_t(n0 + g) * (K / GS);
    const T* br = b + size_t(n0 + g) * (K / GS);
    c[0] = c[1] = c[2] = c[3] = 0.0f;
    for (uint k0 = 0; k0 < K; k0 += 16) {
        uint a[4] = {0u, 0u, 0u, 0u};  // A: row g, cols 2t, 2t + 1 (a[0]) and 2t + 8, 2t + 9 (a[2])
        if (g == 0) {
            a[0] = *reinterpret_cast<const uint*>(x + k0 + 2 * t);
            a[2] = *reinterpret_cast<const uint*>(x + k0 + 2 * t + 8);
        }
        const uint bq[2] = {zmlx_qmm_wpair<BITS, GS>(wr, sr, br, k0 + 2 * t),  // B: col g, rows 2t, 2t + 1
                            zmlx_qmm_wpair<BITS, GS>(wr, sr, br, k0 + 2 * t + 8)};
        zmlx_qmm_t<T>::mma(c, a, bq);
    }
}
#endif
