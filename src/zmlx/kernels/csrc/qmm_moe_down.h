#ifdef ZMLX_CUDA
// moe_down's blocks in qmm_sm80's order (QMM; csrc/qmm_order.h), downproj_combine's QMM block
// (csrc/qmm_down.h) with moe_down's epilogue: where stock's gather_qmm runs qmm_sm80 (8 or more
// (token, expert) rows), one block of K warps computes the 8 outputs (n, d0 .. d0 + 7):
// - warp k: expert slot k's 8 down rows against h's row k on its own accumulator in stock's
//   order (PIPE: zmlx_qmm_row8_chunked, loaded ahead: quant.QMM_PIPELINED; else zmlx_qmm_row8's
//   plain loop), rounded to T as stock rounds y, into shared memory;
// - HAS_SHARED: the shared expert's down rows d0 + j, j = k, k + K, .. < 8, each by one whole
//   warp in qmv's order as moe_down's qmv body does it (zmlx_qdot_lane, warp sum; its one-token
//   dense matmul is stock's qmv), rounded to T, into shared memory;
// - after the barrier warp 0's lanes 0-3, two outputs each: the K experts weighted and summed in
//   moe_combine's order (csrc/expert_sum.h, k = 0, 1, .. as the qmv body's warp sums them),
//   rounded to T, plus the shared output in T, plus the residual in T: moe_down's epilogue, op
//   for op. The block is K warps (32 K threads), the grid N * D / 8 blocks. ON false: nothing.
template <bool ON, bool PIPE, int N, int K, int I, int D, int BITS, int GS, bool SEQUENTIAL, typename P,
          typename A, bool HAS_SHARED, int IS, int SBITS, int SGS, typename T, typename SC, typename W, typename S,
          typename B, typename SW, typename SS, typename SB>
__device__ __forceinline__ void zmlx_qmm_moe_down_block(uint block, uint k, uint lane, const T* h, const uint* inds,
                                                        const SC* scores, const W* down_w, const S* down_s,
                                                        const B* down_b, const T* resid, const T* hs,
                                                        const SW* sdown_w, const SS* sdown_s, const SB* sdown_b,
                                                        T* out) {
    if constexpr (ON) {
        namespace cg = cooperative_groups;  // ZMLX_SIMD_SUM's (the kernel's own alias comes later)
        constexpr uint DT = D / 8;
        constexpr uint UV = 32 / BITS;
        __shared__ float y[K][8];  // each expert's 8 outputs, rounded to T
        __shared__ float ys[8];    // the shared expert's 8 outputs, rounded to T
        const uint d0 = 8 * (block % DT);
        const uint n = block / DT;
        if constexpr (HAS_SHARED) {
            constexpr uint SWORDS = IS / (32 / SBITS);
            constexpr uint SGROUPS = IS / SGS;
            for (uint j = k; j < 8; j += K) {  // warp-uniform: every lane reaches the warp sum
                const size_t d = d0 + j;
                float sacc = zmlx_qdot_lane<SBITS, SGS, IS>(sdown_w + d * SWORDS, sdown_s + d * SGROUPS,
                                                            sdown_b + d * SGROUPS, hs + size_t(n) * IS, lane);
                sacc = ZMLX_SIMD_SUM(sacc);
                if (lane == 0) ys[j] = static_cast<float>(static_cast<T>(sacc));
            }
        }
        const size_t e = inds[n * K + k];
        const T* const hk = h + (size_t(n) * K + k) * I;
        const uint* const w = down_w + e * D * (I / UV);
        const T* const s = down_s + e * D * (I / GS);
        const T* const b = down_b + e * D * (I / GS);
        float c[4];
        if constexpr (PIPE) {
            zmlx_qmm_row8_chunked<BITS, GS, I, 16>(hk, w, s, b, d0, lane, c);
        } else {
            zmlx_qmm_row8<BITS, GS, I>(hk, w, s, b, d0, lane, c);
        }
        if (lane < 4) {
            y[k][2 * lane] = static_cast<float>(static_cast<T>(c[0]));
            y[k][2 * lane + 1] = static_cast<float>(static_cast<T>(c[1]));
        }
        __syncthreads();
        if (k == 0 && lane < 4) {
            for (uint j = 2 * lane; j < 2 * lane + 2; ++j) {
                ZmlxExpertSum<SEQUENTIAL, P, A> sum;
                for (uint kk = 0; kk < K; ++kk) sum.add(y[kk][j], static_cast<float>(scores[n * K + kk]));
                float v = static_cast<float>(static_cast<T>(sum.total()));
                if (HAS_SHARED) v = static_cast<float>(static_cast<T>(ZMLX_ADD(v, ys[j])));
                const size_t o = size_t(n) * D + d0 + j;
                out[o] = static_cast<T>(ZMLX_ADD(static_cast<float>(resid[o]), v));
            }
        }
    }
}
#endif
