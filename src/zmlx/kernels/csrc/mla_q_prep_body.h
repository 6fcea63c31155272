// mla_q_prep: TG threads per threadgroup; threadgroups 0 .. NB - 1 are (b, head, slice)
// triples, NB .. NB + B - 1 the kv rows of sequence b. A slice is (q slice, embed slice):
// - the nope variant (ES 1) spreads a head's QW rows over QS threadgroups of QL rows (more of
//   the GPU at once, fewer rounds of dependent loads per warp);
// - with embed_q (QS 1, QL = QW) a head's kv_lora_rank embed rows go to ES threadgroups of
//   R / ES rows; each computes the head's q_nope rows (embed_q needs the whole row), and slice
//   0 also its rope rows (q_pe is written once).
// q threadgroup (every slice the same steps 1 and 2, over its rows):
// 1. q_a_layernorm of q_a[b] in MLX's rms_norm order (residual_norm_body.h's mapping: threads
//    below QBLOCK own MLX's elements; the others' warps add +0.0 where MLX zero-fills), the
//    row kept in zmlx_xn (T on CUDA, aligned as stock's fresh array; float on Metal).
// 2. the slice's rows of the head's q_b_proj rows, warp w taking RQ rows at once (w * RQ ..,
//    then TG / 32 * RQ further; each row's dot in stock's qmv (gemv) order (csrc/quant.h),
//    the RQ rows' loads in flight together) on CUDA, RW rows at once as float32 sums on
//    Metal; each rounded to T, kept as float in zmlx_q.
// 3. q_pe's RD / 2 pairs roped (those of the slice's rows; QL even, so no pair is split)
//    (glm47_rope's arithmetic and table row; YaRN's mscale on the input, ZMLX_ROPE_IN) and
//    scaled in T; embed_q's rows of the slice from q_nope in float32 (mla.h's row dots, as
//    mla_embed_q); or, with ZMLX_QV 0 (mla_q_prep_nope), no embed_q: q_nope out, the head's
//    NOPE rows as rounded to T; or, with ZMLX_QV 2 (mla_q_prep_embed, CUDA), embed_q in
//    qmm_sm80's order times SDPA's scale, each in T as stock rounds it.
// kv threadgroup: kv_a_layernorm of ckv[b][:R] in the same order, and the rope of k_pe (the same).
ZMLX_SHARED float zmlx_sums[32];
ZMLX_SHARED float zmlx_q[QL];
#ifdef ZMLX_CUDA
__shared__ __align__(16) T zmlx_xn[QLR];
#else
threadgroup float zmlx_xn[QLR];
#endif
// The mean-square reduction of one row in MLX's rms_norm order: each thread below BLOCK
// accumulates its values (read by the caller's VALUE(d)), then residual_norm.h's ZMLX_RMS_INV.
#define ZMLX_QP_RMS(BLOCK, CHUNKS, NR, D, VALUE, INV)                                   \
    {                                                                                   \
        float zacc = 0.0f;                                                              \
        if (zmlx_lid < BLOCK) {                                                         \
            for (uint zi = 0; zi < CHUNKS; ++zi) {                                      \
                for (uint zj = 0; zj < NR; ++zj) {                                      \
                    const uint d = (BLOCK * zi + zmlx_lid) * NR + zj;                   \
                    if (d < D) {                                                        \
                        const float zt = VALUE;                                         \
                        ZMLX_SQ_ACC(zacc, zt);                                          \
                    }                                                                   \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        ZMLX_RMS_INV(zinv, zacc, zmlx_sums, D, EPS_BITS);                               \
        INV = zinv;                                                                     \
    }
// w * T(x * inv) in T, as MLX's rms_norm writes it
#define ZMLX_QP_NORMED(X, W, INV) \
    static_cast<T>(ZMLX_MUL(static_cast<float>(W), static_cast<float>(static_cast<T>(ZMLX_MUL((X), (INV))))))
if (zmlx_gid >= NB) {
    const uint b = zmlx_gid - NB;
    const size_t src = size_t(b) * KVW;
    float inv;
    ZMLX_QP_RMS(KBLOCK, KCHUNKS, KNR, R, static_cast<float>(ckv[src + d]), inv)
    if (zmlx_lid < KBLOCK) {
        for (uint i = 0; i < KCHUNKS; ++i) {
            for (uint j = 0; j < KNR; ++j) {
                const uint d = (KBLOCK * i + zmlx_lid) * KNR + j;
                if (d < R) kv_latent[size_t(b) * R + d] = ZMLX_QP_NORMED(static_cast<float>(ckv[src + d]), kv_w[d], inv);
            }
        }
    }
    if (zmlx_lid < RD / 2) {
        const uint i = zmlx_lid;
        const float c = cs[2 * i], s = cs[2 * i + 1];
        const float x1 = ZMLX_ROPE_IN(static_cast<float>(ckv[src + R + 2 * i]));
        const float x2 = ZMLX_ROPE_IN(static_cast<float>(ckv[src + R + 2 * i + 1]));
        k_pe[size_t(b) * RD + 2 * i] = static_cast<T>(ZMLX_ROPE_X1(x1, x2, c, s));
        k_pe[size_t(b) * RD + 2 * i + 1] = static_cast<T>(ZMLX_ROPE_X2(x1, x2, c, s));
    }
    return;
}
const uint bh = zmlx_gid / (QS * ES);  // b * H + h
const uint b = bh / H;
const uint h = bh % H;
const uint es = zmlx_gid % (QS * ES) / QS;           // the embed slice (0 without embed_q)
const uint r0 = (zmlx_gid % QS) * QL;               // the slice's first row of the head's QW
const uint qrows = es == 0 ? QW : NOPE;              // a later embed slice needs q_nope only
const uint nq = qrows - r0 < QL ? qrows - r0 : QL;   // the slice's number of rows
// 1. q_a_layernorm
{
    const size_t src = size_t(b) * QLR;
    float inv;
    ZMLX_QP_RMS(QBLOCK, QCHUNKS, QNR, QLR, static_cast<float>(q_a[src + d]), inv)
    if (zmlx_lid < QBLOCK) {
        for (uint i = 0; i < QCHUNKS; ++i) {
            for (uint j = 0; j < QNR; ++j) {
                const uint d = (QBLOCK * i + zmlx_lid) * QNR + j;
                if (d < QLR) zmlx_xn[d] = ZMLX_QP_NORMED(static_cast<float>(q_a[src + d]), qa_w[d], inv);
            }
        }
    }
}
ZMLX_BARRIER;
// 2. q_b_proj: the slice's rows h * QW + r0 .. h * QW + r0 + nq - 1
#ifdef ZMLX_CUDA
constexpr uint QWORDS = QLR * QBITS / 32;  // packed words (or values, unquantized) per row
constexpr uint QGROUPS = QLR / QGS;
for (uint j0 = 0; j0 < QL; j0 += (TG / 32) * RQ) {  // every warp the same number of rounds
    float g[RQ];
#pragma unroll
    for (uint r = 0; r < RQ; ++r) {  // the RQ rows' loads issued together: independent rows
        const uint j = j0 + zmlx_warp * RQ + r;
        g[r] = 0.0f;
        if (j < nq) {
            const size_t row = size_t(h) * QW + r0 + j;
            g[r] = zmlx_qdot_lane<QBITS, QGS, QLR>(qb_w + row * QWORDS, qb_s + (QBITS == 32 ? 0 : row * QGROUPS),
                                                   qb_b + (QBITS == 32 ? 0 : row * QGROUPS), zmlx_xn, zmlx_lane);
        }
    }
#pragma unroll
    for (uint r = 0; r < RQ; ++r) {
        const uint j = j0 + zmlx_warp * RQ + r;
        const float v = ZMLX_SIMD_SUM(g[r]);
        if (zmlx_lane == 0 && j < nq) zmlx_q[j] = static_cast<float>(static_cast<T>(v));  // stock's matmul: T
    }
}
#else
{
    ZMLX_MLA_X_UNITS(QBITS, QLR, zmlx_xn, xq, xqsum)
    for (uint j0 = 0; j0 < QL; j0 += (TG / 32) * RW) {  // every warp the same simd ops before the barrier
        const uint j = j0 + zmlx_warp * RW;
        const uint nrows = j >= nq ? 0 : nq - j < RW ? nq - j : RW;  // the same for the whole warp
        float acc[RW];
        zmlx_mla_rows<QBITS, QGS, QLR, RW>(qb_w, qb_s, qb_b, size_t(h) * QW + r0 + j, nrows, zmlx_lane, xq, xqsum, acc);
        for (uint r = 0; r < nrows; ++r) {
            if (zmlx_lane == 0) zmlx_q[j + r] = static_cast<float>(static_cast<T>(acc[r]));
        }
    }
}
#endif
ZMLX_BARRIER;
// 3. the rope of q_pe and its scale (one rounding of the product of two values of T)
if (zmlx_lid < RD / 2 && NOPE + 2 * zmlx_lid >= r0 && NOPE + 2 * zmlx_lid < r0 + nq) {
    const uint i = zmlx_lid;
    const uint q = NOPE + 2 * i - r0;  // the pair's first row in the slice
    const float c = cs[2 * i], s = cs[2 * i + 1];
    const float x1 = ZMLX_ROPE_IN(zmlx_q[q]), x2 = ZMLX_ROPE_IN(zmlx_q[q + 1]);
    const float sc = ZMLX_FLOAT_BITS(SCALE_BITS);
    const size_t dst = size_t(bh) * RD + 2 * i;
    const T r1 = static_cast<T>(ZMLX_ROPE_X1(x1, x2, c, s));
    const T r2 = static_cast<T>(ZMLX_ROPE_X2(x1, x2, c, s));
    q_pe[dst] = static_cast<T>(ZMLX_MUL(static_cast<float>(r1), sc));
    q_pe[dst + 1] = static_cast<T>(ZMLX_MUL(static_cast<float>(r2), sc));
}
#if ZMLX_QV == 2 && defined(ZMLX_CUDA)
// ... and embed_q as stock's qmm_sm80 computes it (csrc/qmm_order.h: 8 rows a warp, the
// head's q_nope row in T as the mma's A row), rounded to T and times SDPA's scale in T
// (its fallback's first multiply): q_s[b, h], the slice's R / ES rows (mla_q_prep_embed)
__shared__ __align__(16) T zmlx_qt[NOPE];
for (uint j = zmlx_lid; j < NOPE; j += TG) zmlx_qt[j] = static_cast<T>(zmlx_q[j]);
ZMLX_BARRIER;
{
    constexpr uint ER = R / ES;
    constexpr uint UV = 32 / EBITS;
    const float sc = ZMLX_FLOAT_BITS(SCALE_BITS);
    const size_t head = size_t(h) * R;
    for (uint t = zmlx_warp; t < ER / 8; t += TG / 32) {  // whole warps: the mma takes all 32 lanes
        const uint n0 = es * ER + 8 * t;
        float c[4];
        zmlx_qmm_row8<EBITS, EGS, NOPE>(zmlx_qt, eq_w + head * (NOPE / UV), eq_s + head * (NOPE / EGS),
                                        eq_b + head * (NOPE / EGS), n0, zmlx_lane, c);
        if (zmlx_lane < 4) {
            for (uint j = 0; j < 2; ++j) {
                const float e = static_cast<float>(static_cast<T>(c[j]));  // embed_q's output, T
                q_s[size_t(bh) * R + n0 + 2 * zmlx_lane + j] = static_cast<T>(ZMLX_MUL(e, sc));
            }
        }
    }
}
#elif ZMLX_QV
// ... and embed_q: qv[b, h] = W_q[h] @ q_nope in float32, the slice's R / ES rows (on Metal,
// mla_q_prep_embed's q_s: that sum rounded to T, times SDPA's scale in T: close)
#if ZMLX_QV == 2
#define ZMLX_QV_OUT(i, v) q_s[i] = static_cast<T>(ZMLX_MUL(static_cast<float>(static_cast<T>(v)), ZMLX_FLOAT_BITS(SCALE_BITS)))
#else
#define ZMLX_QV_OUT(i, v) qv[i] = (v)
#endif
ZMLX_MLA_X_UNITS(EBITS, NOPE, zmlx_q, xr, xsum)
constexpr uint ER = R / ES;  // embed rows per slice
for (uint j0 = 0; j0 < ER; j0 += (TG / 32) * RW) {
    const uint j = es * ER + j0 + zmlx_warp * RW;
    if (j0 + zmlx_warp * RW < ER) {  // the same for the whole warp
        const uint nrows = ER - (j - es * ER) < RW ? ER - (j - es * ER) : RW;
        float acc[RW];
        zmlx_mla_rows<EBITS, EGS, NOPE, RW>(eq_w, eq_s, eq_b, size_t(h) * R + j, nrows, zmlx_lane, xr, xsum, acc);
        for (uint r = 0; r < nrows; ++r) {
            if (zmlx_lane == 0) ZMLX_QV_OUT(size_t(bh) * R + j + r, acc[r]);
        }
    }
}
#else
// ... and q_nope as stock's q_b_proj output (zmlx_q holds each row's value of T): the slice's
for (uint j = zmlx_lid; j < nq && r0 + j < NOPE; j += TG) q_nope[size_t(bh) * NOPE + r0 + j] = static_cast<T>(zmlx_q[j]);
#endif
