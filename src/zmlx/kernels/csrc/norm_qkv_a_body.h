// norm_qkv_a: G threadgroups of TG threads per token (TG >= BLOCK, whole warps); warp w of
// group g computes row g * TG / 32 + w of [q_a rows 0..RQ) | ckv rows RQ..RQ + RKV)].
// 1. every group: the sum of squares of x in MLX's rms_norm order, as norm_router_body.h
//    (threads below BLOCK own the elements MLX's threads own; the warps of threads from
//    BLOCK on sum +0.0 into the slots of zmlx_sums that MLX fills with its +0.0 init value:
//    the 32-wide second reduce sees the same values in the same places, bitwise MLX's sum).
// 2. xn = w * T(x * rsqrt(mean + eps)) into zmlx_xn (each element read and written by the
//    one thread that owns it, so no barrier between 1 and 2).
// 3. each warp its row's dot with xn, rounded to T (stock's matvec output).
const uint token = zmlx_gid / G;
const size_t base = size_t(token) * D;
ZMLX_SHARED float zmlx_sums[32];
#ifdef ZMLX_CUDA
__shared__ __align__(16) T zmlx_xn[D];  // aligned as stock's xn array (qmv/gemv read it so)
#else
threadgroup T zmlx_xn[D];
#endif
float acc = 0.0f;
if (zmlx_lid < BLOCK) {
    for (uint i = 0; i < CHUNKS; ++i) {
        for (uint j = 0; j < NR; ++j) {
            const uint d = (BLOCK * i + zmlx_lid) * NR + j;
            if (d < D) {
                const T xv = x[base + d];
                zmlx_xn[d] = xv;
                const float t = static_cast<float>(xv);
                ZMLX_SQ_ACC(acc, t);
            }
        }
    }
}
ZMLX_RMS_INV(inv, acc, zmlx_sums, D, EPS_BITS);  // csrc/residual_norm.h
if (zmlx_lid < BLOCK) {
    for (uint i = 0; i < CHUNKS; ++i) {
        for (uint j = 0; j < NR; ++j) {
            const uint d = (BLOCK * i + zmlx_lid) * NR + j;
            if (d < D) {
                const T y = static_cast<T>(ZMLX_MUL(static_cast<float>(static_cast<T>(zmlx_xn[d])), inv));
                zmlx_xn[d] = static_cast<T>(ZMLX_MUL(static_cast<float>(norm_w[d]), static_cast<float>(y)));
            }
        }
    }
}
ZMLX_BARRIER;
const uint row = (zmlx_gid % G) * (TG / 32) + zmlx_warp;
if (row >= RQ + RKV) return;  // whole warps: no simd op or barrier follows for them
const bool is_q = row < RQ;
const uint r = is_q ? row : row - RQ;
float rdot = 0.0f;
#ifdef ZMLX_CUDA
// stock's qmv order (gemv for unquantized rows, BITS = 32): csrc/quant.h
if (is_q) {
    rdot = zmlx_qdot_lane<BITS, GS, D, T>(qa_w + size_t(r) * (D / (32 / BITS)), qa_s + size_t(r) * (D / GS),
                                         qa_b + size_t(r) * (D / GS), zmlx_xn, zmlx_lane);
} else {
    rdot = zmlx_qdot_lane<KV_BITS, KV_GS, D, T>(kva_w + size_t(r) * (D / (32 / KV_BITS)),
                                               kva_s + size_t(r) * (D / KV_GS), kva_b + size_t(r) * (D / KV_GS),
                                               zmlx_xn, zmlx_lane);
}
#else
// a plain float32 sum (close on Metal): lanes take packed words lane, lane + 32, ... of the
// row (values for an unquantized row, NBITS = 32). Both branches compile for both weight
// types (packed uint32 or T: csrc/norm_qkv_a.h); the one NBITS names runs.
#define ZMLX_NQA_DOT(W, S, B, NBITS, NGS)                                                        \
    {                                                                                           \
        constexpr uint PW = 32 / NBITS;                                                         \
        constexpr uint MASK = NBITS == 32 ? 0xffffffffu : (1u << (NBITS % 32)) - 1u;            \
        const size_t wrow = size_t(r) * (D / PW), grow = size_t(r) * (D / NGS);                 \
        for (uint k = zmlx_lane; k < D / PW; k += 32) {                                         \
            if (NBITS == 32) {                                                                  \
                rdot += static_cast<float>(W[wrow + k]) * static_cast<float>(static_cast<T>(zmlx_xn[k])); \
            } else {                                                                            \
                const uint q = zmlx_packed_word(W[wrow + k]);                                   \
                const float sc = static_cast<float>(S[grow + k * PW / NGS]);                     \
                const float bi = static_cast<float>(B[grow + k * PW / NGS]);                     \
                for (uint j = 0; j < PW; ++j) {                                                 \
                    const float v = static_cast<float>((q >> (NBITS * j)) & MASK);              \
                    rdot += (sc * v + bi) * static_cast<float>(static_cast<T>(zmlx_xn[k * PW + j])); \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }
if (is_q) {
    ZMLX_NQA_DOT(qa_w, qa_s, qa_b, BITS, GS)
} else {
    ZMLX_NQA_DOT(kva_w, kva_s, kva_b, KV_BITS, KV_GS)
}
#undef ZMLX_NQA_DOT
#endif
rdot = ZMLX_SIMD_SUM(rdot);
if (zmlx_lane == 0) {
    if (is_q) {
        q_a[size_t(token) * RQ + r] = static_cast<T>(rdot);
    } else {
        ckv[size_t(token) * RKV + r] = static_cast<T>(rdot);
    }
}
