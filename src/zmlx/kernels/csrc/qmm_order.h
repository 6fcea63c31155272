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
// Weights k, k + 1 (k even: one packed word `word`, bits from `sh`, one group: scale sc, bias bi)
// as the B fragment register's pair: q * scale + bias in float (q * scale is exact: q has at
// most 8 bits, the scale 11), rounded to T once. The H200 showed it (qmm_order_probe's exact
// sums): stock's weights are T(q * s + b), not T(T(q * s) + b) as cute_vectorized_dequant reads.
template <int BITS, typename T>
ZMLX_QMM_FN uint zmlx_qmm_wpair(uint word, uint sh, float sc, float bi) {
    constexpr uint MASK = (1u << BITS) - 1u;
    const float w0 = __fmaf_rn(static_cast<float>((word >> sh) & MASK), sc, bi);
    const float w1 = __fmaf_rn(static_cast<float>((word >> (sh + BITS)) & MASK), sc, bi);
    return zmlx_qmm_t<T>::pack(w0, w1);
}
// A warp's 8 weight rows n0 .. n0 + 7 of M matrices against one activation row x, read a chunk
// (U k-blocks, 16 U values from kc) at a time. Lane (g, t) = (lane / 4, lane % 4) loads words
// 4 j + t of the chunk of its row g (every word once: a load instruction reads 4 consecutive
// words of each row) and the chunk's scales and biases the same way, into registers; a k-step
// takes each word from the lane that holds it with a shuffle. So the operands of every mma are
// those of one lane loading what it needs itself, bit for bit, in the same k-block. The weights,
// scales and biases must not change during the kernel (the read-only cache: __ldg); x may be in
// shared memory (mla_q_prep's embed_q).
template <int BITS, int GS, int K, int U, int M, typename T>
struct zmlx_qmm_rows {
    static constexpr uint UV = 32 / BITS;
    static constexpr uint CH = 16 * U;                     // values a chunk
    static constexpr uint NW = CH / UV / 4;                // words a lane loads, a matrix
    static constexpr uint NSC = CH >= GS ? CH / GS : 1;    // groups a chunk spans (part of one: 1)
    static constexpr uint NS = (NSC + 3) / 4;              // scales (biases) a lane loads, a matrix
    static_assert((BITS == 4 || BITS == 8) && GS % 16 == 0 && (GS & (GS - 1)) == 0, "4/8 bits, groups 2^n");
    static_assert(K % CH == 0 && K % GS == 0 && NW >= 1 && NW * 4 * UV == CH, "whole chunks of whole words");
    struct chunk {  // one lane's registers
        uint a0[U], a2[U];  // x's pairs at k0 + 2t and k0 + 2t + 8 (every lane; rows g != 0 use 0)
        uint w[M][NW];
        T s[M][NS], b[M][NS];
    };
    const T* x;
    const uint* w[M];
    const T* s[M];
    const T* b[M];
    uint lane;
    ZMLX_QMM_FN zmlx_qmm_rows(const T* x_, const uint* const (&w_)[M], const T* const (&s_)[M],
                              const T* const (&b_)[M], uint n0, uint lane_)
        : x(x_), lane(lane_) {
        const size_t row = n0 + lane / 4;
#pragma unroll
        for (uint m = 0; m < M; ++m) {
            w[m] = w_[m] + row * (K / UV);
            s[m] = s_[m] + row * (K / GS);
            b[m] = b_[m] + row * (K / GS);
        }
    }
    ZMLX_QMM_FN void load(chunk& r, uint kc) const {
        const uint t = lane % 4;
#pragma unroll
        for (uint u = 0; u < U; ++u) {
            r.a0[u] = *reinterpret_cast<const uint*>(x + kc + 16 * u + 2 * t);
            r.a2[u] = *reinterpret_cast<const uint*>(x + kc + 16 * u + 2 * t + 8);
        }
#pragma unroll
        for (uint m = 0; m < M; ++m) {
#pragma unroll
            for (uint j = 0; j < NW; ++j) r.w[m][j] = __ldg(w[m] + kc / UV + 4 * j + t);
#pragma unroll
            for (uint j = 0; j < NS; ++j) {
                const uint q = kc / GS + (4 * j + t) % NSC;  // lanes past the chunk's groups: a copy
                r.s[m][j] = __ldg(s[m] + q);
                r.b[m][j] = __ldg(b[m] + q);
            }
        }
    }
    // The chunk's lines brought into L1 (prefetch: no register, so the compiler has no use to
    // sink it to, unlike a load): each lane a quarter of its row's words, x's over the warp. A
    // generic prefetch: a no-op on shared memory.
    ZMLX_QMM_FN void prefetch(uint kc) const {
        const uint t = lane % 4;
        asm volatile("prefetch.L1 [%0];" ::"l"(x + kc + lane * (CH / 32)));
#pragma unroll
        for (uint m = 0; m < M; ++m) {
            asm volatile("prefetch.L1 [%0];" ::"l"(w[m] + kc / UV + t * NW));
            asm volatile("prefetch.L1 [%0];" ::"l"(s[m] + kc / GS + t % NSC));
            asm volatile("prefetch.L1 [%0];" ::"l"(b[m] + kc / GS + t % NSC));
        }
    }
    // The chunk's U k-steps in ascending order, one mma each on each matrix's accumulator c[m]:
    // A (row g: cols 2t, 2t + 1 in a[0] and 2t + 8, 2t + 9 in a[2]; rows 1-15 zero), B (col g:
    // rows 2t, 2t + 1 and 2t + 8, 2t + 9, weights k0 + 2t and k0 + 2t + 8 of row g).
    ZMLX_QMM_FN void mma(const chunk& r, float (&c)[M][4]) const {
        const uint g = lane / 4, t = lane % 4, row = lane & ~3u;
        float sc[M], bi[M];
#pragma unroll
        for (uint u = 0; u < U; ++u) {
            if ((16 * u) % GS == 0) {  // the step opens group q: its scale and bias, from lane q % 4
                const uint q = 16 * u / GS;
#pragma unroll
                for (uint m = 0; m < M; ++m) {
                    sc[m] = __shfl_sync(0xffffffffu, static_cast<float>(r.s[m][q / 4]), row | (q % 4));
                    bi[m] = __shfl_sync(0xffffffffu, static_cast<float>(r.b[m][q / 4]), row | (q % 4));
                }
            }
            const uint a[4] = {g == 0 ? r.a0[u] : 0u, 0u, g == 0 ? r.a2[u] : 0u, 0u};
#pragma unroll
            for (uint m = 0; m < M; ++m) {
                uint bq[2];
#pragma unroll
                for (uint h = 0; h < 2; ++h) {
                    // weight kk of the chunk: word kk / UV, held by lane kk / UV % 4 in register
                    // kk / UV / 4 = (16 u + 8 h) / (4 UV) for every t (2t < 8 | 16 u + 8 h)
                    const uint kk = 16 * u + 8 * h + 2 * t;
                    const uint word = __shfl_sync(0xffffffffu, r.w[m][(16 * u + 8 * h) / (4 * UV)], row | (kk / UV % 4));
                    bq[h] = zmlx_qmm_wpair<BITS, T>(word, BITS * (kk % UV), sc[m], bi[m]);
                }
                zmlx_qmm_t<T>::mma(c[m], a, bq);
            }
        }
    }
};
// The same outputs by the plain loop (one k-block at a time, each lane loading what it needs):
// what ran bitwise on the H200 (qmm_order_probe; the cuda tests at a790734). mla_q_prep_embed
// and the probe use it; the expert kernels (moe_mlp, downproj_combine, moe_block's moe_gate_up
// and moe_down) use zmlx_qmm_rows8 only with quant.QMM_PIPELINED (or downproj_combine's
// QMM_DOWN) until its own cuda tests have run on a GPU.
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
        uint bq[2];  // B: col g, rows 2t, 2t + 1 and 2t + 8, 2t + 9 (weights k, k + 1 of row g)
        for (uint h = 0; h < 2; ++h) {
            const uint k = k0 + 2 * t + 8 * h;
            bq[h] = zmlx_qmm_wpair<BITS, T>(wr[k / UV], BITS * (k % UV), static_cast<float>(sr[k / GS]),
                                            static_cast<float>(br[k / GS]));
        }
        zmlx_qmm_t<T>::mma(c, a, bq);
    }
}
// U for rows of K: the largest power of 2 up to UMAX (a power of 2) that divides K / 16.
template <int K, int UMAX>
constexpr uint zmlx_qmm_u() {
    uint u = UMAX;
    while ((K / 16) % u != 0) u /= 2;
    return u;
}
// Outputs n0 .. n0 + 7 of activation row x (K values of T) against rows n0 .. n0 + 7 of each of
// M packed weight matrices (w[m]: K / (32 / BITS) words a row; s[m], b[m]: K / GS a row), in
// qmm_sm80's order: each c[m] from 0, one mma a k-block of 16, k-blocks in ascending order (the
// M chains interleave: independent accumulators). Only the loads move, never an mma: while
// chunk i's mma run, chunk i + 1 is loaded into registers (ptxas issues those loads late in the
// chain, to shorten their lives) and chunk i + 2 prefetched into L1 (which those loads then
// hit): the chain waits on DRAM for the first chunk, then about an L1 hit a chunk, where a
// plain loop waits a round trip every k-block. Every mma,
// its operands and their order are those of a plain loop over k0 = 0, 16, .. K - 16. After the
// call lanes 0-3 (g = 0) hold outputs n0 + 2 lane and n0 + 2 lane + 1 in c[m][0], c[m][1]
// (float; the caller rounds them to T). Every lane of the warp must call it.
template <int BITS, int GS, int K, int M, int UMAX, typename T>
ZMLX_QMM_FN void zmlx_qmm_rows8(const T* x, const uint* const (&w)[M], const T* const (&s)[M],
                                const T* const (&b)[M], uint n0, uint lane, float (&c)[M][4]) {
    constexpr uint U = zmlx_qmm_u<K, UMAX>();
    using R = zmlx_qmm_rows<BITS, GS, K, U, M, T>;
    const R rows(x, w, s, b, n0, lane);
#pragma unroll
    for (uint m = 0; m < M; ++m) c[m][0] = c[m][1] = c[m][2] = c[m][3] = 0.0f;
    typename R::chunk cur, next;
    rows.load(cur, 0);
    rows.prefetch(R::CH % K);
    for (uint kc = 0; kc < K; kc += R::CH) {
        rows.prefetch((kc + 2 * R::CH) % K);  // 2 chunks ahead (the last two: unused)
        rows.load(next, (kc + R::CH) % K);    // 1 ahead (the last: unused)
        rows.mma(cur, c);
        cur = next;
    }
}
// One matrix (M = 1), chunks of up to UMAX k-blocks.
template <int BITS, int GS, int K, int UMAX, typename T>
ZMLX_QMM_FN void zmlx_qmm_row8_chunked(const T* x, const uint* w, const T* s, const T* b, uint n0, uint lane,
                                      float (&c)[4]) {
    const uint* const wm[1] = {w};
    const T* const sm[1] = {s};
    const T* const bm[1] = {b};
    float cm[1][4];
    zmlx_qmm_rows8<BITS, GS, K, 1, UMAX>(x, wm, sm, bm, n0, lane, cm);
#pragma unroll
    for (uint j = 0; j < 4; ++j) c[j] = cm[0][j];
}
#endif
