#ifdef ZMLX_CUDA
// downproj_combine's warps in qmm_sm80's order (QMM; csrc/qmm_order.h): where stock's
// gather_qmm runs qmm_sm80 (8 or more (token, expert) rows), one warp computes the 8 outputs
// (n, d0 .. d0 + 7): for each expert in order, its 8 down rows against h's row on a fresh
// accumulator in stock's order, rounded to T as stock rounds y, then weighted and summed in
// moe_combine's order (csrc/expert_sum.h), one sum per output; lanes 0-3 hold two outputs
// each and add the shared expert's output as the qmv body does. ON false: nothing.
template <bool ON, int N, int K, int I, int D, int BITS, int GS, bool SEQUENTIAL, typename P, typename A,
          bool HAS_SHARED, typename T, typename SC, typename W, typename S, typename B>
__device__ __forceinline__ void zmlx_qmm_down_warp(uint w8, uint lane, const T* h, const uint* inds,
                                                   const SC* scores, const W* down_w, const S* down_s,
                                                   const B* down_b, const T* shared, T* out) {
    if constexpr (ON) {
        constexpr uint DT = D / 8;
        constexpr uint UV = 32 / BITS;
        if (w8 >= N * DT) return;  // whole warps: every lane takes part in the mma
        const uint d0 = 8 * (w8 % DT);
        const uint n = w8 / DT;
        ZmlxExpertSum<SEQUENTIAL, P, A> sum0, sum1;
        for (uint k = 0; k < K; ++k) {
            const size_t e = inds[n * K + k];
            float c[4];
            zmlx_qmm_row8<BITS, GS, I>(h + (size_t(n) * K + k) * I, down_w + e * D * (I / UV),
                                       down_s + e * D * (I / GS), down_b + e * D * (I / GS), d0, lane, c);
            const float score = static_cast<float>(scores[n * K + k]);
            sum0.add(static_cast<float>(static_cast<T>(c[0])), score);
            sum1.add(static_cast<float>(static_cast<T>(c[1])), score);
        }
        if (lane < 4) {
            for (uint j = 0; j < 2; ++j) {
                const size_t o = size_t(n) * D + d0 + 2 * lane + j;
                const T r = static_cast<T>(j == 0 ? sum0.total() : sum1.total());
                out[o] = HAS_SHARED ? static_cast<T>(static_cast<float>(r) + static_cast<float>(shared[o])) : r;
            }
        }
    }
}
#endif
