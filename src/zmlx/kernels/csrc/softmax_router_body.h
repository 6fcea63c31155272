// One 32-lane warp (simdgroup) per token; lane l holds experts l * N .. l * N + N - 1 (MLX's
// softmax layout, N = 16 / sizeof(T)). LAST: the top-k is the last k of the ascending sort, in
// ascending order (Qwen3-MoE, gpt-oss), else the first k of the ascending sort of -values
// (Mixtral). picked[k] is the k-th chosen: output j is picked[K - 1 - j] with LAST, else picked[j].
const uint row = zmlx_tid / 32;
const uint lane = zmlx_tid % 32;
if (row >= ROWS) return;  // whole warps only: the grid is a multiple of 32
const float ninf = -ZMLX_FLOAT_BITS(0x7f800000);
// the values the top-k sorts: Qwen3-MoE the probabilities rounded to T, Mixtral and gpt-oss
// the logits
ZmlxRow<N> cand;
for (uint i = 0; i < N; ++i) {
    const uint e = lane * N + i;
    // BIAS: the router's bias added first, as stock's QuantizedLinear adds it (in T, rounded)
    cand.v[i] = e < E ? (BIAS ? static_cast<float>(static_cast<T>(ZMLX_ADD(static_cast<float>(gates[row * E + e]),
                                                                         static_cast<float>(bias[e]))))
                              : static_cast<float>(gates[row * E + e]))
                      : ninf;
}
if (SOFTMAX_FIRST) {
    const ZmlxRow<N> p = zmlx_softmax_warp<N>(cand, lane);
    for (uint i = 0; i < N; ++i) cand.v[i] = static_cast<float>(static_cast<T>(p.v[i]));
}
float picked[K];  // in the order chosen (every lane holds them)
uint taken = 0;
for (uint k = 0; k < K; ++k) {
    // this lane's first choice among the experts left ...
    float bv = 0.0f, bi = -1.0f;  // value, expert index (exact in a float)
    for (uint i = 0; i < N; ++i) {
        const uint e = lane * N + i;
        if (e < E && !((taken >> i) & 1u) &&
            (bi < 0.0f || zmlx_chosen_before<LAST>(cand.v[i], static_cast<float>(e), bv, bi))) {
            bv = cand.v[i];
            bi = static_cast<float>(e);
        }
    }
    // ... then the warp's: a strict order on (value, index), so every lane ends with it
    for (uint off = 16; off > 0; off /= 2) {
        const float ov = ZMLX_SHFL_XOR(bv, off);
        const float oi = ZMLX_SHFL_XOR(bi, off);
        if (oi >= 0.0f && (bi < 0.0f || zmlx_chosen_before<LAST>(ov, oi, bv, bi))) {
            bv = ov;
            bi = oi;
        }
    }
    const uint best = static_cast<uint>(bi);
    if (best / N == lane) taken |= 1u << (best % N);
    picked[k] = bv;
    // the last k of the ascending sort: the first chosen is the last output
    if (lane == 0) inds[row * K + (LAST ? K - 1 - k : k)] = best;
}
if (SOFTMAX_FIRST) {
    // scores in index order; MLX's row sum in T: lane l adds values l * N .. in order from
    // T(0), then a butterfly sum of the lanes' partial sums
    T den = static_cast<T>(0.0f);
    if (NORM) {
        for (uint i = 0; i < N; ++i) {
            const uint j = lane * N + i;
            den = den + (j < K ? static_cast<T>(picked[LAST ? K - 1 - j : j]) : static_cast<T>(0.0f));
        }
        for (uint off = 16; off > 0; off /= 2) {
            den = den + static_cast<T>(ZMLX_SHFL_XOR(static_cast<float>(den), off));
        }
    }
    if (lane == 0) {
        for (uint j = 0; j < K; ++j) {
            const T s = static_cast<T>(picked[LAST ? K - 1 - j : j]);
            scores[row * K + j] = NORM ? static_cast<T>(s / den) : s;
        }
    }
} else {
    // Mixtral, gpt-oss: the softmax of the k chosen logits in output order, a row of K values
    // laid out as MLX's
    ZmlxRow<N> x;
    for (uint i = 0; i < N; ++i) {
        const uint j = lane * N + i;
        x.v[i] = j < K ? picked[LAST ? K - 1 - j : j] : ninf;
    }
    const ZmlxRow<N> p = zmlx_softmax_warp<N>(x, lane);
    for (uint i = 0; i < N; ++i) {
        const uint j = lane * N + i;
        if (j < K) scores[row * K + j] = static_cast<T>(p.v[i]);
    }
}
