// softmax_router's device helpers: MLX's CUDA softmax of one row by one warp, in MLX's own
// arithmetic order (mlx/backend/cuda/softmax.cu, precise: float32 accumulation).
#ifdef ZMLX_CUDA
#define ZMLX_SOFTMAX_EXP(x) __expf(x)  // MLX's softmax_exp
#else
#define ZMLX_SOFTMAX_EXP(x) metal::exp(x)  // Metal: close (MLX's Metal softmax reduces otherwise)
#endif

template <uint N>
struct ZmlxRow {  // a lane's N values of a row: elements lane * N .. lane * N + N - 1
    float v[N];
};

// cooperative_groups' greater: (a < b) ? b : a (a NaN in `a` stays, one in `b` is dropped)
inline float zmlx_greater(float a, float b) {
    return (a < b) ? b : a;
}

// lane 0's value on every lane (moves bits only; every lane calls it)
inline float zmlx_from_lane0(float v, uint lane) {
    for (uint m = 1; m < 32; m *= 2) {
        const float o = ZMLX_SHFL_XOR(v, m);
        if (lane & m) v = o;
    }
    return v;
}

// MLX's CUDA softmax of one row held by one warp (a block of 32 threads: the row has at most
// 32 * N values, N = 16 / sizeof(T)), out of range values -inf as MLX loads them. Each lane
// returns its values' probabilities before the rounding to T, as MLX computes them: the
// lane's max (from -FLT_MAX) and online sum of exp(x - max), a butterfly max and a butterfly
// sum of the lanes' sums rescaled to the warp's max, then the block stage (one warp: lane
// 0's values), 1 / sum, and exp(x - max) * (1 / sum). The product and the butterfly sum are
// written as MLX writes them, so that the compiler contracts them as it does MLX's.
template <uint N>
inline ZmlxRow<N> zmlx_softmax_warp(ZmlxRow<N> x, uint lane) {
    const float lowest = -ZMLX_FLOAT_BITS(0x7f7fffff);
    const float ninf = -ZMLX_FLOAT_BITS(0x7f800000);
    float prevmax = lowest;
    float maxval = lowest;
    float normalizer = 0.0f;
    for (uint i = 0; i < N; ++i) maxval = zmlx_greater(maxval, x.v[i]);
    normalizer = normalizer * ZMLX_SOFTMAX_EXP(prevmax - maxval);
    for (uint i = 0; i < N; ++i) normalizer = normalizer + ZMLX_SOFTMAX_EXP(x.v[i] - maxval);
    // the warp
    prevmax = maxval;
    for (uint m = 16; m > 0; m /= 2) maxval = zmlx_greater(maxval, ZMLX_SHFL_XOR(maxval, m));
    normalizer = normalizer * ZMLX_SOFTMAX_EXP(prevmax - maxval);
    for (uint m = 16; m > 0; m /= 2) normalizer = normalizer + ZMLX_SHFL_XOR(normalizer, m);
    // the block's stage: one warp, so lane 0's max and sum, the other lanes' -inf and 0
    prevmax = maxval;
    const float max0 = zmlx_from_lane0(maxval, lane);
    maxval = lane == 0 ? max0 : ninf;
    for (uint m = 16; m > 0; m /= 2) maxval = zmlx_greater(maxval, ZMLX_SHFL_XOR(maxval, m));
    normalizer = normalizer * ZMLX_SOFTMAX_EXP(prevmax - maxval);
    const float sum0 = zmlx_from_lane0(normalizer, lane);
    normalizer = lane == 0 ? sum0 : 0.0f;
    for (uint m = 16; m > 0; m /= 2) normalizer = normalizer + ZMLX_SHFL_XOR(normalizer, m);
    normalizer = 1.0f / normalizer;
    ZmlxRow<N> out;
    for (uint i = 0; i < N; ++i) out.v[i] = ZMLX_SOFTMAX_EXP(x.v[i] - maxval) * normalizer;
    return out;
}

// Whether (av, ai) is chosen before (bv, bi). LAST (Qwen3-MoE: argpartition(p)[-k:], gpt-oss:
// argpartition(g)[-k:]): the last of MLX's stable ascending sort first (NaN the largest; of
// equal values the higher index). Otherwise (Mixtral: argpartition(-g)[:k]): the first of the
// ascending sort of -g (NaN last; of equal values the lower index).
template <bool LAST>
inline bool zmlx_chosen_before(float av, float ai, float bv, float bi) {
    if (LAST) return zmlx_less(bv, av) || (!zmlx_less(av, bv) && ai > bi);
    return zmlx_before(av, bv) || (!zmlx_before(bv, av) && ai < bi);
}
