#ifdef ZMLX_CUDA
// downproj_combine's blocks in qmm_sm80's order (QMM; csrc/qmm_order.h): where stock's
// gather_qmm runs qmm_sm80 (8 or more (token, expert) rows), one block of K warps computes the
// 8 outputs (n, d0 .. d0 + 7): warp k, expert slot k's 8 down rows against h's row k on its own
// accumulator in stock's order, rounded to T as stock rounds y (into shared memory); then warp
// 0's lanes 0-3 weight and sum the K experts in moe_combine's order (csrc/expert_sum.h), one
// sum per output, k = 0, 1, .. as one warp summed them, and add the shared expert's output as
// the qmv body does. The block is K warps (32 K threads), the grid N * D / 8 blocks. ON false:
// nothing.
template <bool ON, int N, int K, int I, int D, int BITS, int GS, bool SEQUENTIAL, typename P, typename A,
          bool HAS_SHARED, typename T, typename SC, typename W, typename S, typename B>
__device__ __forceinline__ void zmlx_qmm_down_block(uint block, uint k, uint lane, const T* h, const uint* inds,
                                                    const SC* scores, const W* down_w, const S* down_s,
                                                    const B* down_b, const T* shared, T* out) {
    if constexpr (ON) {
        constexpr uint DT = D / 8;
        constexpr uint UV = 32 / BITS;
        __shared__ float y[K][8];  // each expert's 8 outputs, rounded to T
        const uint d0 = 8 * (block % DT);
        const uint n = block / DT;
        const size_t e = inds[n * K + k];
        float c[4];
        zmlx_qmm_row8_chunked<BITS, GS, I, 16>(h + (size_t(n) * K + k) * I, down_w + e * D * (I / UV), down_s + e * D * (I / GS),
                                   down_b + e * D * (I / GS), d0, lane, c);
        if (lane < 4) {
            y[k][2 * lane] = static_cast<float>(static_cast<T>(c[0]));
            y[k][2 * lane + 1] = static_cast<float>(static_cast<T>(c[1]));
        }
        __syncthreads();
        if (k == 0 && lane < 4) {
            for (uint j = 0; j < 2; ++j) {
                ZmlxExpertSum<SEQUENTIAL, P, A> sum;
                for (uint kk = 0; kk < K; ++kk) sum.add(y[kk][2 * lane + j], static_cast<float>(scores[n * K + kk]));
                const size_t o = size_t(n) * D + d0 + 2 * lane + j;
                const T r = static_cast<T>(sum.total());
                out[o] = HAS_SHARED ? static_cast<T>(static_cast<float>(r) + static_cast<float>(shared[o])) : r;
            }
        }
    }
}
#endif
