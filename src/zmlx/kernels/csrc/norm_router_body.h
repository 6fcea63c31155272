// norm_router: the residual add, the RMSNorm and the gate dots; two modes, ZMLX_ROUTE (a
// macro the KernelDef's header defines: the two modes have different outputs).
// ZMLX_ROUTE 1 (norm_router): one threadgroup of TG threads per token (GROUPS = 1, GPT = E),
//   warp 0 routes (csrc/moe_router.h's zmlx_route_warp) and writes inds and scores.
// ZMLX_ROUTE 0 (norm_router_gates): GROUPS threadgroups per token, threadgroup p takes the
//   experts [p * GPT, p * GPT + GPT) and writes their gates (rounded to T); each recomputes
//   h and the RMS (the same values in every group), threadgroup 0 alone writes h and xn.
// TG >= BLOCK, whole warps. Steps:
// 1. h = x + r and the sum of squares in MLX's rms_norm order (residual_norm_body.h's
//    BLOCK/CHUNKS/NR mapping): threads below BLOCK own the elements MLX's threads own;
//    threads from BLOCK on own none, so their warps' sums are +0.0, written into the slots
//    of zmlx_sums that MLX fills with its +0.0 init value: the 32-wide second reduce sees
//    the same values in the same places, and the sum is bitwise MLX's.
// 2. xn = w * T(h * rsqrt(mean + eps)), to global memory and into zmlx_xn (each element
//    read and written by the one thread that owns it, so no barrier between 1 and 2).
// 3. the group's gate dots, warps taking experts warp, warp + TG / 32, ...; each rounded to T.
const uint tok = zmlx_gid / GROUPS;
const uint part = zmlx_gid % GROUPS;
const bool lead = part == 0;  // the threadgroup that writes h and xn
const size_t base = size_t(tok) * D;
ZMLX_SHARED float zmlx_sums[32];
#if ZMLX_ROUTE
ZMLX_SHARED float zmlx_gates[E];
#endif
#ifdef ZMLX_CUDA
__shared__ __align__(16) T zmlx_xn[D];  // aligned as stock's xn array (gemv checks it)
#else
threadgroup T zmlx_xn[D];
#endif
float acc = 0.0f;
if (zmlx_lid < BLOCK) {
    for (uint i = 0; i < CHUNKS; ++i) {
        for (uint j = 0; j < NR; ++j) {
            const uint d = (BLOCK * i + zmlx_lid) * NR + j;
            if (d < D) {
                const T hv = static_cast<T>(
                    ZMLX_ADD(static_cast<float>(x[base + d]), static_cast<float>(r[base + d])));
                if (lead) h[base + d] = hv;
                zmlx_xn[d] = hv;
                const float t = static_cast<float>(hv);
                ZMLX_SQ_ACC(acc, t);
            }
        }
    }
}
ZMLX_RMS_INV(inv, acc, zmlx_sums, D, NORM_EPS_BITS);  // csrc/residual_norm.h
if (zmlx_lid < BLOCK) {
    for (uint i = 0; i < CHUNKS; ++i) {
        for (uint j = 0; j < NR; ++j) {
            const uint d = (BLOCK * i + zmlx_lid) * NR + j;
            if (d < D) {
                const T y = static_cast<T>(ZMLX_MUL(static_cast<float>(static_cast<T>(zmlx_xn[d])), inv));
                const T v = static_cast<T>(ZMLX_MUL(static_cast<float>(norm_w[d]), static_cast<float>(y)));
                if (lead) xn[base + d] = v;
                zmlx_xn[d] = v;
            }
        }
    }
}
ZMLX_BARRIER;
// every warp makes the same number of rounds (the same simd ops before the barrier)
for (uint e0 = 0; e0 < GPT; e0 += TG / 32) {
    const uint e = part * GPT + e0 + zmlx_warp;
    const bool mine = e0 + zmlx_warp < GPT && e < E;
    float g = 0.0f;
    if (mine) {
#ifdef ZMLX_CUDA
        // stock's gemv order at one row (csrc/quant.h, BITS = 32)
        g = zmlx_qdot_lane<32, D, D, T>(gate_w + size_t(e) * D, gate_w, gate_w, zmlx_xn, zmlx_lane);
#else
        for (uint c = zmlx_lane; c < D; c += 32) {  // a plain float32 sum (close on Metal)
            g += static_cast<float>(gate_w[size_t(e) * D + c]) * static_cast<float>(static_cast<T>(zmlx_xn[c]));
        }
#endif
    }
    g = ZMLX_SIMD_SUM(g);
    if (zmlx_lane == 0 && mine) {
#if ZMLX_ROUTE
        zmlx_gates[e] = static_cast<float>(static_cast<T>(g));  // stock's matmul: T
#else
        gates[size_t(tok) * E + e] = static_cast<T>(g);
#endif
    }
}
#if ZMLX_ROUTE
ZMLX_BARRIER;
if (zmlx_warp != 0) return;
const ZmlxRoute<K> route = zmlx_route_warp<E, K, N_GROUP, TOPK_GROUP, NORM, HAS_EPS, RENORM_EPS_BITS, SCALE_BITS>(
    zmlx_gates, bias, zmlx_lane);
if (zmlx_lane == 0) {
    for (uint k = 0; k < K; ++k) {
        inds[tok * K + k] = route.inds[k];
        scores[tok * K + k] = route.scores[k];
    }
}
#endif
