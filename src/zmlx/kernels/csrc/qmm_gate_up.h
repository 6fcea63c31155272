#ifdef ZMLX_CUDA
// moe_mlp's warps in qmm_sm80's order (QMM; csrc/qmm_order.h): where stock's gather_qmm runs
// qmm_sm80 (8 or more (token, expert) rows), one warp computes 8 outputs (n, slot, i0 .. i0 + 7)
// of the gate and the up projection, each dot on its own accumulator in stock's order (the two
// chains interleave in one loop over the k-blocks, x's chunk loaded once for both); lanes 0-3
// then round each to T, add the projections' biases and apply the activation as the qmv body
// does (out[((n * K) + slot) * I + i]). PIPE: the dots by zmlx_qmm_rows8 (chunks loaded ahead,
// the two chains interleaved: quant.QMM_PIPELINED); else by zmlx_qmm_row8's plain loop, one
// projection after the other (as run bitwise on the H200). ON false: nothing (the body's other
// order runs), and nothing here is instantiated, whatever the pointers' types.
template <bool ON, bool PIPE, int N, int K, int I, int D, int BITS, int GS, bool BIAS, bool OAI, typename T,
          typename W, typename S, typename B, typename PB>
__device__ __forceinline__ void zmlx_qmm_gate_up_warp(uint w8, uint lane, const T* x, const uint* inds,
                                                      const W* gate_w, const S* gate_s, const B* gate_b,
                                                      const W* up_w, const S* up_s, const B* up_b,
                                                      const PB* gate_pb, const PB* up_pb, T* out, float alpha,
                                                      float limit) {
    if constexpr (ON) {
        constexpr uint IT = I / 8;
        constexpr uint UV = 32 / BITS;
        if (w8 >= N * K * IT) return;  // whole warps: every lane takes part in the mma
        const uint i0 = 8 * (w8 % IT);
        const uint slot = (w8 / IT) % K;
        const uint n = w8 / (IT * K);
        const size_t e = inds[n * K + slot];
        const uint* const w[2] = {gate_w + e * I * (D / UV), up_w + e * I * (D / UV)};
        const T* const s[2] = {gate_s + e * I * (D / GS), up_s + e * I * (D / GS)};
        const T* const b[2] = {gate_b + e * I * (D / GS), up_b + e * I * (D / GS)};
        float c[2][4];  // c[0]: gate, c[1]: up
        if constexpr (PIPE) {
            zmlx_qmm_rows8<BITS, GS, D, 2, 16>(x + size_t(n) * D, w, s, b, i0, lane, c);
        } else {
            for (uint m = 0; m < 2; ++m) zmlx_qmm_row8<BITS, GS, D>(x + size_t(n) * D, w[m], s[m], b[m], i0, lane, c[m]);
        }
        if (lane < 4) {
            for (uint j = 0; j < 2; ++j) {
                const uint i = i0 + 2 * lane + j;
                T g = static_cast<T>(c[0][j]);
                T u = static_cast<T>(c[1][j]);
                if (BIAS) {
                    g = zmlx_add(g, static_cast<T>(gate_pb[e * I + i]));
                    u = zmlx_add(u, static_cast<T>(up_pb[e * I + i]));
                }
                out[(size_t(n) * K + slot) * I + i] = OAI ? zmlx_swiglu_oai(g, u, alpha, limit) : zmlx_swiglu(g, u);
            }
        }
    }
}
#endif
