
template <bool SEQUENTIAL>
struct ZmlxExpertSum {
    // in order when SEQUENTIAL; else MLX's CUDA looped column reduce: lane k % 32 sums
    // its rows in order, then a 32-lane tree (offsets 16, 8, 4, 2, 1) adds the lanes
    float lane[SEQUENTIAL ? 1 : 32];
    uint k;
    ZmlxExpertSum() : k(0) {
        for (uint j = 0; j < (SEQUENTIAL ? 1u : 32u); ++j) lane[j] = 0.0f;
    }
    void add(float term) {
        const uint j = SEQUENTIAL ? 0u : k % 32;
        lane[j] = ZMLX_ADD(lane[j], term);
        ++k;
    }
    float total() {
        if (!SEQUENTIAL) {
            for (uint off = 16; off > 0; off /= 2) {
                for (uint j = 0; j < off; ++j) lane[j] = ZMLX_ADD(lane[j], lane[j + off]);
            }
        }
        return lane[0];
    }
};
