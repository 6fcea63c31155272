// moe_gate_up: warps [0, ROUTED) are the routed experts' rows (moe_mlp's body:
// out[((n * K) + slot) * I + i]), one warp per output element, or with QMM (CUDA, where stock's
// gather_qmm runs qmm_sm80) one warp per 8 outputs i0 .. i0 + 7 (csrc/qmm_gate_up.h's
// zmlx_qmm_gate_up8, moe_mlp's QMM warps); warps [ROUTED, ROUTED + N*IS) are the shared expert's
// rows (swiglu_mlp's: sout[n * IS + i], one warp an output: its one-token matmul is stock's qmv
// whatever the routed side runs), with their own packing (SGS, SBITS). Each warp takes one side
// whole, so every warp sum (and mma) is reached by all 32 lanes; no barrier: any block size.
// ZMLX_ROUTE (a macro the KernelDef's header defines: the modes have different inputs and
// outputs): 0 (moe_gate_up) reads the experts from inds; 1 (moe_gate_up_route) takes the
// router's gates (N, E) and bias, and every routed warp routes its token itself
// (csrc/moe_router.h's zmlx_route_warp, warp-level only); the token's first warp writes
// inds and scores, as the router would.
const uint warp_id = zmlx_tid / 32;
const uint lane = zmlx_tid % 32;
constexpr uint IW = QMM ? I / 8 : I;  // warps a (token, slot) row: one an output, or one per 8 (QMM)
constexpr uint ROUTED = N * K * IW;
if (warp_id < ROUTED) {
    const uint iw = warp_id % IW;
    const uint slot = (warp_id / IW) % K;
    const uint n = warp_id / (IW * K);
#if ZMLX_ROUTE
    const ZmlxRoute<K> route = zmlx_route_warp<E, K, N_GROUP, TOPK_GROUP, NORM, HAS_EPS, EPS_BITS, SCALE_BITS>(
        gates + size_t(n) * E, bias, lane);
    uint expert = 0;  // route.inds[slot], without a local-memory array
    for (uint k = 0; k < K; ++k) expert = k == slot ? route.inds[k] : expert;
    if (lane == 0 && slot == 0 && iw == 0) {
        for (uint k = 0; k < K; ++k) {
            inds[n * K + k] = route.inds[k];
            scores[n * K + k] = route.scores[k];
        }
    }
#else
    const uint expert = inds[n * K + slot];
#endif
#ifdef ZMLX_CUDA
    if (QMM) {  // outputs 8 iw .. 8 iw + 7 of row (n, slot) in qmm_sm80's order, SwiGLU as below
        zmlx_qmm_gate_up8<QMM, PIPE, I, D, BITS, GS, false, false>(
            x + size_t(n) * D, expert, 8 * iw, lane, gate_w, gate_s, gate_b, up_w, up_s, up_b, x, x,
            out + (size_t(n) * K + slot) * I, 0.0f, 0.0f);
        return;
    }
#endif
    const uint i = iw;
    const size_t row = size_t(expert) * I + i;
    constexpr uint WORDS = D / (32 / BITS);
    constexpr uint GROUPS = D / GS;
    float acc_g = zmlx_gqdot_lane<BITS, GS, D, FPQMV>(gate_w + row * WORDS, gate_s + row * GROUPS,
                                              gate_b + row * GROUPS, x + size_t(n) * D, lane);
    float acc_u = zmlx_gqdot_lane<BITS, GS, D, FPQMV>(up_w + row * WORDS, up_s + row * GROUPS,
                                              up_b + row * GROUPS, x + size_t(n) * D, lane);
    acc_g = ZMLX_SIMD_SUM(acc_g);
    acc_u = ZMLX_SIMD_SUM(acc_u);
    if (lane == 0) {
        // stock rounds gate and up to T (qmv's output), then applies swiglu in T
        out[warp_id] = zmlx_swiglu(static_cast<T>(acc_g), static_cast<T>(acc_u));
    }
} else if (warp_id < ROUTED + N * IS) {
    const uint j = warp_id - ROUTED;
    const size_t row = j % IS;
    const uint n = j / IS;
    constexpr uint SWORDS = D / (32 / SBITS);
    constexpr uint SGROUPS = D / SGS;
    float acc_g = zmlx_qdot_lane<SBITS, SGS, D>(sgate_w + row * SWORDS, sgate_s + row * SGROUPS,
                                                sgate_b + row * SGROUPS, x + size_t(n) * D, lane);
    float acc_u = zmlx_qdot_lane<SBITS, SGS, D>(sup_w + row * SWORDS, sup_s + row * SGROUPS,
                                                sup_b + row * SGROUPS, x + size_t(n) * D, lane);
    acc_g = ZMLX_SIMD_SUM(acc_g);
    acc_u = ZMLX_SIMD_SUM(acc_u);
    if (lane == 0) {
        sout[j] = zmlx_swiglu(static_cast<T>(acc_g), static_cast<T>(acc_u));
    }
}
