#ifdef ZMLX_CUDA
// One (token, expert) row's 8 outputs i0 .. i0 + 7 of the gate and the up projection in
// qmm_sm80's order (csrc/qmm_order.h): x, that token's D activations; e, the expert; out, the
// row's I outputs. Each dot on its own accumulator in stock's order (PIPE: zmlx_qmm_rows8, chunks
// loaded ahead, the two chains interleaved, x's chunk loaded once for both: quant.QMM_PIPELINED;
// else zmlx_qmm_row8's plain loop, one projection after the other, as run bitwise on the H200);
// lanes 0-3 then round each to T, add the projections' biases and apply the activation as the
// qmv body does. Every lane of the warp must call it. ON false: nothing, and nothing here is
// instantiated, whatever the pointers' types. moe_mlp's warps and moe_gate_up's routed warps.
template <bool ON, bool PIPE, int I, int D, int BITS, int GS, bool BIAS, bool OAI, typename T, typename W,
          typename S, typename B, typename PB>
__device__ __forceinline__ void zmlx_qmm_gate_up8(const T* x, size_t e, uint i0, uint lane, const W* gate_w,
                                                  const S* gate_s, const B* gate_b, const W* up_w, const S* up_s,
                                                  const B* up_b, const PB* gate_pb, const PB* up_pb, T* out,
                                                  float alpha, float limit) {
    if constexpr (ON) {
        constexpr uint UV = 32 / BITS;
        const uint* const w[2] = {gate_w + e * I * (D / UV), up_w + e * I * (D / UV)};
        const T* const s[2] = {gate_s + e * I * (D / GS), up_s + e * I * (D / GS)};
        const T* const b[2] = {gate_b + e * I * (D / GS), up_b + e * I * (D / GS)};
        float c[2][4];  // c[0]: gate, c[1]: up
        if constexpr (PIPE) {
            zmlx_qmm_rows8<BITS, GS, D, 2, 16>(x, w, s, b, i0, lane, c);
        } else {
            for (uint m = 0; m < 2; ++m) zmlx_qmm_row8<BITS, GS, D>(x, w[m], s[m], b[m], i0, lane, c[m]);
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
                out[i] = OAI ? zmlx_swiglu_oai(g, u, alpha, limit) : zmlx_swiglu(g, u);
            }
        }
    }
}
// moe_mlp's warps in qmm_sm80's order (QMM): where stock's gather_qmm runs qmm_sm80 (8 or more
// (token, expert) rows), warp w8 computes the 8 outputs (n, slot, i0 .. i0 + 7) of
// out[((n * K) + slot) * I + i] by zmlx_qmm_gate_up8. ON false: nothing.
template <bool ON, bool PIPE, int N, int K, int I, int D, int BITS, int GS, bool BIAS, bool OAI, typename T,
          typename W, typename S, typename B, typename PB>
__device__ __forceinline__ void zmlx_qmm_gate_up_warp(uint w8, uint lane, const T* x, const uint* inds,
                                                      const W* gate_w, const S* gate_s, const B* gate_b,
                                                      const W* up_w, const S* up_s, const B* up_b,
                                                      const PB* gate_pb, const PB* up_pb, T* out, float alpha,
                                                      float limit) {
    if constexpr (ON) {
        constexpr uint IT = I / 8;
        if (w8 >= N * K * IT) return;  // whole warps: every lane takes part in the mma
        const uint i0 = 8 * (w8 % IT);
        const uint slot = (w8 / IT) % K;
        const uint n = w8 / (IT * K);
        const size_t e = inds[n * K + slot];
        zmlx_qmm_gate_up8<true, PIPE, I, D, BITS, GS, BIAS, OAI>(x + size_t(n) * D, e, i0, lane, gate_w, gate_s,
                                                                 gate_b, up_w, up_s, up_b, gate_pb, up_pb,
                                                                 out + (size_t(n) * K + slot) * I, alpha, limit);
    }
}
#endif
