// norm_router: one threadgroup of TG threads per token (TG >= BLOCK, whole warps).
// 1. h = x + r and the sum of squares in MLX's rms_norm order (residual_norm_body.h's
//    BLOCK/CHUNKS/NR mapping): threads below BLOCK own the elements MLX's threads own;
//    threads from BLOCK on own none, so their warps' sums are +0.0, written into the slots
//    of zmlx_sums that MLX fills with its +0.0 init value: the 32-wide second reduce sees
//    the same values in the same places, and the sum is bitwise MLX's.
// 2. xn = w * T(h * rsqrt(mean + eps)), to global memory and into zmlx_xn (each element
//    read and written by the one thread that owns it, so no barrier between 1 and 2).
// 3. the E gate dots, warps taking experts warp, warp + TG / 32, ...; each rounded to T.
// 4. warp 0 routes, as moe_router_body.h does for one token.
const size_t base = size_t(zmlx_gid) * D;
ZMLX_SHARED float zmlx_sums[32];
ZMLX_SHARED float zmlx_gates[E];
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
                h[base + d] = hv;
                zmlx_xn[d] = hv;
                const float t = static_cast<float>(hv);
                ZMLX_SQ_ACC(acc, t);
            }
        }
    }
}
acc = ZMLX_SIMD_SUM(acc);
if (zmlx_warp == 0) zmlx_sums[zmlx_lane] = 0.0f;
ZMLX_BARRIER;
if (zmlx_lane == 0) zmlx_sums[zmlx_warp] = acc;
ZMLX_BARRIER;
acc = ZMLX_SIMD_SUM(static_cast<float>(zmlx_sums[zmlx_lane]));
const float inv = ZMLX_RSQRT(ZMLX_ADD(acc / static_cast<float>(D), ZMLX_FLOAT_BITS(NORM_EPS_BITS)));
if (zmlx_lid < BLOCK) {
    for (uint i = 0; i < CHUNKS; ++i) {
        for (uint j = 0; j < NR; ++j) {
            const uint d = (BLOCK * i + zmlx_lid) * NR + j;
            if (d < D) {
                const T y = static_cast<T>(ZMLX_MUL(static_cast<float>(static_cast<T>(zmlx_xn[d])), inv));
                const T v = static_cast<T>(ZMLX_MUL(static_cast<float>(norm_w[d]), static_cast<float>(y)));
                xn[base + d] = v;
                zmlx_xn[d] = v;
            }
        }
    }
}
ZMLX_BARRIER;
// every warp makes the same number of rounds (the same simd ops before the barrier)
for (uint e0 = 0; e0 < E; e0 += TG / 32) {
    const uint e = e0 + zmlx_warp;
    float g = 0.0f;
    if (e < E) {
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
    if (zmlx_lane == 0 && e < E) zmlx_gates[e] = static_cast<float>(static_cast<T>(g));  // stock's matmul: T
}
ZMLX_BARRIER;
if (zmlx_warp != 0) return;
// the routing of moe_router_body.h for this token: lane l holds experts l, l + 32, ...
const uint lane = zmlx_lane;
constexpr uint PER = (E + 31) / 32;
ZmlxScores<PER> biased;
uint taken = 0;
for (uint m = 0; m < PER; ++m) {
    const uint e = lane + 32 * m;
    biased.v[m] = e < E ? ZMLX_ADD(zmlx_sigmoid(static_cast<float>(zmlx_gates[e])), static_cast<float>(bias[e]))
                        : 0.0f;
}
if (N_GROUP > 1) biased = zmlx_limit_groups<E, N_GROUP, TOPK_GROUP>(biased, lane);
float picked[K];
for (uint k = 0; k < K; ++k) {
    float bv = 0.0f, bi = -1.0f;  // this lane's best remaining (value, expert index)
    for (uint m = 0; m < PER; ++m) {
        const uint e = lane + 32 * m;
        if (e < E && !((taken >> m) & 1u) && (bi < 0.0f || zmlx_before(biased.v[m], bv))) {
            bv = biased.v[m];
            bi = static_cast<float>(e);
        }
    }
    for (uint off = 16; off > 0; off /= 2) {  // the warp's best: the same on every lane
        const float ov = ZMLX_SHFL_XOR(bv, off);
        const float oi = ZMLX_SHFL_XOR(bi, off);
        if (oi >= 0.0f && (bi < 0.0f || zmlx_before(ov, bv) || (!zmlx_before(bv, ov) && oi < bi))) {
            bv = ov;
            bi = oi;
        }
    }
    const uint best = static_cast<uint>(bi);
    if (best % 32 == lane) taken |= 1u << (best / 32);
    picked[k] = zmlx_sigmoid(static_cast<float>(zmlx_gates[best]));
    if (lane == 0) inds[zmlx_gid * K + k] = best;
}
if (lane != 0) return;
float den = 0.0f;
if (NORM) {  // MLX's row reduce of k <= 8 values: partial sums of 4, in order
    for (uint k = 0; k < K && k < 4; ++k) den = ZMLX_ADD(den, picked[k]);
    if (K > 4) {
        float second = 0.0f;
        for (uint k = 4; k < K; ++k) second = ZMLX_ADD(second, picked[k]);
        den = ZMLX_ADD(den, second);
    }
    if (HAS_EPS) den = ZMLX_ADD(den, ZMLX_FLOAT_BITS(RENORM_EPS_BITS));
}
for (uint k = 0; k < K; ++k) {
    const float s = NORM ? picked[k] / den : picked[k];
    scores[zmlx_gid * K + k] = ZMLX_MUL(s, ZMLX_FLOAT_BITS(SCALE_BITS));
}
