inline float zmlx_sigmoid(float x) {
#ifdef ZMLX_CUDA
    const float y = 1.0f / (1.0f + expf(fabsf(x)));
#else
    const float y = 1.0f / (1.0f + metal::exp(metal::abs(x)));
#endif
    return (x < 0) ? y : 1.0f - y;
}
// a comes before b in MLX's ascending sort (NaN sorts last: the largest)
inline bool zmlx_less(float a, float b) {
    const bool an = a != a, bn = b != b;
    if (an || bn) return !an && bn;
    return a < b;
}
// a comes before b in MLX's ascending sort of -score (NaN sorts last: picked last)
inline bool zmlx_before(float a, float b) {
    return zmlx_less(-a, -b);
}
// The two largest values seen, in MLX's sort order (NaN the largest), largest first. Values
// only: their sum is all the group step reads. -inf starts it: a group holds >= 2 experts,
// so a start value left in the pair can only equal the experts' own (-inf).
struct ZmlxTop2 {
    float first, second;
};
inline ZmlxTop2 zmlx_top2_add(ZmlxTop2 t, float first, float second) {
    if (zmlx_less(t.first, first)) {
        t.second = zmlx_less(t.first, second) ? second : t.first;
        t.first = first;
    } else if (zmlx_less(t.second, first)) {
        t.second = first;
    }
    return t;
}

template <uint PER>
struct ZmlxScores {  // a lane's biased scores: experts lane, lane + 32, ...
    float v[PER];
};
// Group-limited routing (DeepSeek-V3), on a warp's biased scores: the groups are G = E / NG
// consecutive experts; a group's score is the sum of its two largest biased scores (mx.topk:
// a partition, ascending, the last two, summed from the smaller); the D = NG - TG groups
// first in MLX's stable ascending sort of those sums (ties: the lower group first) have
// their scores set to 0.0, not dropped. Every lane of the warp calls it.
template <uint E, uint NG, uint TG, uint PER>
inline ZmlxScores<PER> zmlx_limit_groups(ZmlxScores<PER> s, uint lane) {
    constexpr uint G = E / NG;
    constexpr uint D = NG - TG;
    const float ninf = -ZMLX_FLOAT_BITS(0x7f800000);
    float sums[NG];
    for (uint g = 0; g < NG; ++g) {
        ZmlxTop2 t = {ninf, ninf};
        for (uint m = 0; m < PER; ++m) {
            const uint e = lane + 32 * m;
            if (e < E && e / G == g) t = zmlx_top2_add(t, s.v[m], ninf);
        }
        for (uint off = 16; off > 0; off /= 2) {
            t = zmlx_top2_add(t, ZMLX_SHFL_XOR(t.first, off), ZMLX_SHFL_XOR(t.second, off));
        }
        // lanes may hold zeros of either sign here: equal in every comparison below
        sums[g] = ZMLX_ADD(t.second, t.first);
    }
    uint zeroed = 0;
    for (uint g = 0; g < NG; ++g) {
        uint pos = 0;  // g's position in the stable ascending sort of the sums
        for (uint h = 0; h < NG; ++h) {
            pos += (zmlx_less(sums[h], sums[g]) || (h < g && !zmlx_less(sums[g], sums[h]))) ? 1u : 0u;
        }
        if (pos < D) zeroed |= 1u << g;
    }
    for (uint m = 0; m < PER; ++m) {
        const uint e = lane + 32 * m;
        if (e < E && ((zeroed >> (e / G)) & 1u)) s.v[m] = 0.0f;
    }
    return s;
}

template <uint K>
struct ZmlxRoute {  // one token's routing: the same on every lane of the warp that computed it
    uint inds[K];
    float scores[K];
};
// The routing of one token by one 32-lane warp (every lane calls it; no barrier), as
// moe_router.py's docstring says: lane l holds experts l, l + 32, ...; sigmoid, the bias for
// selection, the group limit, k rounds of "best remaining" (per lane, then a butterfly on
// (sort position, index)), the renormalization in MLX's row-reduce order (partial sums of
// 4, in order) and the routed scaling, each a separate float32 op. gates[e] and bias[e]
// are read as floats (any dtype; a device or threadgroup array).
template <uint E, uint K, uint N_GROUP, uint TOPK_GROUP, bool NORM, bool HAS_EPS, int EPS_BITS, int SCALE_BITS,
          typename G, typename B>
inline ZmlxRoute<K> zmlx_route_warp(G gates, B bias, uint lane) {
    constexpr uint PER = (E + 31) / 32;
    ZmlxScores<PER> biased;
    uint taken = 0;
    for (uint m = 0; m < PER; ++m) {
        const uint e = lane + 32 * m;
        biased.v[m] = e < E ? ZMLX_ADD(zmlx_sigmoid(static_cast<float>(gates[e])), static_cast<float>(bias[e]))
                            : 0.0f;
    }
    if (N_GROUP > 1) biased = zmlx_limit_groups<E, N_GROUP, TOPK_GROUP>(biased, lane);
    ZmlxRoute<K> out;
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
        picked[k] = zmlx_sigmoid(static_cast<float>(gates[best]));
        out.inds[k] = best;
    }
    float den = 0.0f;
    if (NORM) {  // MLX's row reduce of k <= 8 values: partial sums of 4, in order
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
        out.scores[k] = ZMLX_MUL(s, ZMLX_FLOAT_BITS(SCALE_BITS));
    }
    return out;
}
