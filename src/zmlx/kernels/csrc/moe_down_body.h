#ifdef ZMLX_CUDA
if (QMM) {  // qmm_sm80's order: a block of K warps per 8 outputs, a warp an expert (csrc/qmm_moe_down.h)
    zmlx_qmm_moe_down_block<QMM, PIPE, N, K, I, D, BITS, GS, SEQUENTIAL, P, A, HAS_SHARED, IS, SBITS, SGS>(
        zmlx_gid, zmlx_warp, zmlx_lane, h, inds, scores, down_w, down_s, down_b, resid, hs, sdown_w, sdown_s,
        sdown_b, out);
    return;
}
#endif
// moe_down: one warp per output value (n, d): out[n * D + d].
const uint warp_id = zmlx_tid / 32;
const uint lane = zmlx_tid % 32;
if (warp_id >= N * D) return;  // whole warps only: the grid is a multiple of 32
const uint d = warp_id % D;
const uint n = warp_id / D;
constexpr uint WORDS = I / (32 / BITS);
constexpr uint GROUPS = I / GS;
float y;  // stock's output of the MLP before the residual add, already rounded to T
if (DENSE) {
    // the dense MLP's down projection: one matrix (D, I), h (N, I)
    float acc = zmlx_qdot_lane<BITS, GS, I>(down_w + size_t(d) * WORDS, down_s + size_t(d) * GROUPS,
                                            down_b + size_t(d) * GROUPS, h + size_t(n) * I, lane);
    acc = ZMLX_SIMD_SUM(acc);
    y = static_cast<float>(static_cast<T>(acc));
} else {
    // downproj_combine's routed sum: each expert's row rounded to T, weighted and summed in
    // P and A (float32, or T where the scores are in T: moe_combine.sum_dtypes) in
    // moe_combine's order, the total rounded to T
    ZmlxExpertSum<SEQUENTIAL, P, A> sum;
    for (uint k = 0; k < K; ++k) {
        const size_t row = size_t(inds[n * K + k]) * D + d;
        float acc = zmlx_gqdot_lane<BITS, GS, I, FPQMV>(down_w + row * WORDS, down_s + row * GROUPS,
                                                down_b + row * GROUPS, h + (size_t(n) * K + k) * I, lane);
        acc = ZMLX_SIMD_SUM(acc);  // every lane holds the row's sum
        float yk = static_cast<float>(static_cast<T>(acc));
        if (EBIAS) {  // the expert's bias, added in T (mlx-lm's SwitchLinear: gpt-oss's down projection)
            yk = static_cast<float>(static_cast<T>(ZMLX_ADD(yk, static_cast<float>(ebias[size_t(inds[n * K + k]) * D + d]))));
        }
        sum.add(yk, static_cast<float>(scores[n * K + k]));
    }
    y = static_cast<float>(static_cast<T>(sum.total()));
    if (HAS_SHARED) {
        // the shared expert's down row (its own packing), rounded to T, added in T as stock adds it
        constexpr uint SWORDS = IS / (32 / SBITS);
        constexpr uint SGROUPS = IS / SGS;
        float sacc = zmlx_qdot_lane<SBITS, SGS, IS>(sdown_w + size_t(d) * SWORDS, sdown_s + size_t(d) * SGROUPS,
                                                    sdown_b + size_t(d) * SGROUPS, hs + size_t(n) * IS, lane);
        sacc = ZMLX_SIMD_SUM(sacc);
        y = static_cast<float>(static_cast<T>(ZMLX_ADD(y, static_cast<float>(static_cast<T>(sacc)))));
    }
}
if (lane == 0) {
    // the decoder layer's residual add, in T
    out[warp_id] = static_cast<T>(ZMLX_ADD(static_cast<float>(resid[warp_id]), y));
}
