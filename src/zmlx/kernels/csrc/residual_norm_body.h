
#ifdef ZMLX_CUDA
auto zmlx_tile = cg::tiled_partition<32>(cg::this_thread_block());
#define ZMLX_SIMD_SUM(v) cg::reduce(zmlx_tile, (v), cg::plus<float>())
#else
#define ZMLX_SIMD_SUM(v) simd_sum(v)
#endif
const size_t base = size_t(zmlx_gid) * D;
float hs[CHUNKS * NR];
float acc = 0.0f;
for (uint i = 0; i < CHUNKS; ++i) {
    for (uint j = 0; j < NR; ++j) {
        const uint d = (BLOCK * i + zmlx_lid) * NR + j;
        if (d < D) {
            const T hv = static_cast<T>(
                ZMLX_ADD(static_cast<float>(x[base + d]), static_cast<float>(r[base + d])));
            h[base + d] = hv;
            const float t = static_cast<float>(hv);
            hs[i * NR + j] = t;
            ZMLX_SQ_ACC(acc, t);
        }
    }
}
acc = ZMLX_SIMD_SUM(acc);
ZMLX_SHARED float zmlx_sums[32];
if (zmlx_warp == 0) zmlx_sums[zmlx_lane] = 0.0f;
ZMLX_BARRIER;
if (zmlx_lane == 0) zmlx_sums[zmlx_warp] = acc;
ZMLX_BARRIER;
acc = ZMLX_SIMD_SUM(zmlx_sums[zmlx_lane]);
const float inv = ZMLX_RSQRT(ZMLX_ADD(acc / static_cast<float>(D), ZMLX_FLOAT_BITS(EPS_BITS)));
for (uint i = 0; i < CHUNKS; ++i) {
    for (uint j = 0; j < NR; ++j) {
        const uint d = (BLOCK * i + zmlx_lid) * NR + j;
        if (d < D) {
            const T y = static_cast<T>(ZMLX_MUL(hs[i * NR + j], inv));
            out[base + d] = static_cast<T>(ZMLX_MUL(static_cast<float>(w[d]), static_cast<float>(y)));
        }
    }
}
