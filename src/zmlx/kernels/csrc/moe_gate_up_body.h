// moe_gate_up: one warp per output element. Warps [0, N*K*I) are the routed experts' rows
// (moe_mlp's body: out[((n * K) + slot) * I + i]); warps [N*K*I, N*K*I + N*IS) are the
// shared expert's rows (swiglu_mlp's: sout[n * IS + i]), with their own packing (SGS, SBITS).
// Each warp takes one side whole, so every warp sum is reached by all 32 lanes.
// ZMLX_ROUTE (a macro the KernelDef's header defines: the modes have different inputs and
// outputs): 0 (moe_gate_up) reads the experts from inds; 1 (moe_gate_up_route) takes the
// router's gates (N, E) and bias, and every routed warp routes its token itself
// (csrc/moe_router.h's zmlx_route_warp, warp-level only); the token's first warp writes
// inds and scores, as the router would.
const uint warp_id = zmlx_tid / 32;
const uint lane = zmlx_tid % 32;
constexpr uint ROUTED = N * K * I;
if (warp_id < ROUTED) {
    const uint i = warp_id % I;
    const uint slot = (warp_id / I) % K;
    const uint n = warp_id / (I * K);
#if ZMLX_ROUTE
    const ZmlxRoute<K> route = zmlx_route_warp<E, K, N_GROUP, TOPK_GROUP, NORM, HAS_EPS, EPS_BITS, SCALE_BITS>(
        gates + size_t(n) * E, bias, lane);
    uint expert = 0;  // route.inds[slot], without a local-memory array
    for (uint k = 0; k < K; ++k) expert = k == slot ? route.inds[k] : expert;
    if (lane == 0 && slot == 0 && i == 0) {
        for (uint k = 0; k < K; ++k) {
            inds[n * K + k] = route.inds[k];
            scores[n * K + k] = route.scores[k];
        }
    }
#else
    const uint expert = inds[n * K + slot];
#endif
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
