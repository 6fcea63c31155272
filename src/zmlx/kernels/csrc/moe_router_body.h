// One 32-lane warp (simdgroup) per token: csrc/moe_router.h's zmlx_route_warp.
const uint row = zmlx_tid / 32;
const uint lane = zmlx_tid % 32;
if (row >= ROWS) return;  // whole warps only: the grid is a multiple of 32
const ZmlxRoute<K> route = zmlx_route_warp<E, K, N_GROUP, TOPK_GROUP, NORM, HAS_EPS, EPS_BITS, SCALE_BITS>(
    gates + size_t(row) * E, bias, lane);
if (lane == 0) {
    for (uint k = 0; k < K; ++k) {
        inds[row * K + k] = route.inds[k];
        scores[row * K + k] = route.scores[k];
    }
}
