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
