
// One 32-lane warp (simdgroup) per token; lane l holds experts l, l + 32, ...
const uint row = zmlx_tid / 32;
const uint lane = zmlx_tid % 32;
if (row >= ROWS) return;  // whole warps only: the grid is a multiple of 32
constexpr uint PER = (E + 31) / 32;
ZmlxScores<PER> biased;
uint taken = 0;
for (uint m = 0; m < PER; ++m) {
    const uint e = lane + 32 * m;
    biased.v[m] = e < E
        ? ZMLX_ADD(zmlx_sigmoid(static_cast<float>(gates[row * E + e])), static_cast<float>(bias[e]))
        : 0.0f;
}
if (N_GROUP > 1) biased = zmlx_limit_groups<E, N_GROUP, TOPK_GROUP>(biased, lane);
float picked[K];
for (uint k = 0; k < K; ++k) {
    // this lane's best remaining expert (strict: the lower index wins a tie) ...
    float bv = 0.0f, bi = -1.0f;  // value, expert index (exact in a float)
    for (uint m = 0; m < PER; ++m) {
        const uint e = lane + 32 * m;
        if (e < E && !((taken >> m) & 1u) && (bi < 0.0f || zmlx_before(biased.v[m], bv))) {
            bv = biased.v[m];
            bi = static_cast<float>(e);
        }
    }
    // ... then the warp's: the minimum of (sort position, index) is the same on every lane
    for (uint off = 16; off > 0; off /= 2) {
        const float ov = ZMLX_SHFL_XOR(bv, off);
        const float oi = ZMLX_SHFL_XOR(bi, off);
        if (oi >= 0.0f && (bi < 0.0f || zmlx_before(ov, bv) || (!zmlx_before(bv, ov) && oi < bi))) {
            bv = ov;
            bi = oi;
        }
    }
    const uint best = static_cast<uint>(bi);
    if (best % 32 == lane) taken |= 1u << (best / 32);
    picked[k] = zmlx_sigmoid(static_cast<float>(gates[row * E + best]));
    if (lane == 0) inds[row * K + k] = best;
}
if (lane != 0) return;
float den = 0.0f;
if (NORM) {
    for (uint k = 0; k < K && k < 4; ++k) den = ZMLX_ADD(den, picked[k]);
    if (K > 4) {
        float second = 0.0f;
        for (uint k = 4; k < K; ++k) second = ZMLX_ADD(second, picked[k]);
        den = ZMLX_ADD(den, second);
    }
    if (HAS_EPS) den = ZMLX_ADD(den, ZMLX_FLOAT_BITS(EPS_BITS));
}
for (uint k = 0; k < K; ++k) {
    const float s = NORM ? picked[k] / den : picked[k];
    scores[row * K + k] = ZMLX_MUL(s, ZMLX_FLOAT_BITS(SCALE_BITS));
}
