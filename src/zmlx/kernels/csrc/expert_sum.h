
template <bool SEQUENTIAL, typename P = float, typename A = float>
struct ZmlxExpertSum {
    // in order when SEQUENTIAL; else MLX's CUDA looped column reduce: lane k % 32 sums
    // its rows in order, then a 32-lane tree (offsets 16, 8, 4, 2, 1) adds the lanes.
    // P: the products' type, A: the sum's. Scores in float32 (a gate module's): both float
    // (rounding to float is the identity). Scores in the activations' dtype T (the softmax
    // routers of Qwen3-MoE and Mixtral): products in T; MLX's CUDA column reduce then adds
    // in T too (each partial sum rounded), its CPU backend in float.
    float lane[SEQUENTIAL ? 1 : 32];
    uint k;
    ZmlxExpertSum() : k(0) {
        for (uint j = 0; j < (SEQUENTIAL ? 1u : 32u); ++j) lane[j] = 0.0f;
    }
    static float in_a(float x) { return static_cast<float>(static_cast<A>(x)); }
    // the next expert's output (already in the activations' dtype) times its score
    void add(float y, float score) {
        const uint j = SEQUENTIAL ? 0u : k % 32;
        lane[j] = in_a(ZMLX_ADD(lane[j], static_cast<float>(static_cast<P>(ZMLX_MUL(y, score)))));
        ++k;
    }
    float total() {
        if (!SEQUENTIAL) {
            for (uint off = 16; off > 0; off /= 2) {
                for (uint j = 0; j < off; ++j) lane[j] = in_a(ZMLX_ADD(lane[j], lane[j + off]));
            }
        }
        return lane[0];
    }
};
