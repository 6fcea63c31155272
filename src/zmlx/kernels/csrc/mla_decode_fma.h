
// mla_decode's FMA path, the pieces its body (csrc/mla_decode_body.h) shares with mla_decode_q's
// (csrc/mla_decode_q_body.h): macros, because they declare and update the body's own register
// arrays in place; one text, so both kernels do the same arithmetic in the same order. Last,
// mla_decode_q's packed-word loader.

// This threadgroup's (b, chunk c, head group g) of NC chunks of CH positions and NG groups of
// WPB * HPW heads; hw, this warp's first head (a last group's spare warps return); p0, the
// chunk's first position, c * SPAN_ (CH, or zmlx_mla_span's spread of a shorter valid
// length). Declares NC, NG, g, c, b, hw and p0.
#define ZMLX_MLA_FMA_GRID(SPAN_)                                                                  \
    const uint NC = (S + CH - 1) / CH;                                                            \
    const uint NG = (H + HPW * WPB - 1) / (HPW * WPB);                                            \
    const uint g = zmlx_gid % NG;                                                                 \
    const uint c = (zmlx_gid / NG) % NC;                                                          \
    const uint b = zmlx_gid / (NG * NC);                                                          \
    const uint hw = (g * WPB + zmlx_warp) * HPW; /* this warp's first head */                     \
    if (hw >= H) return; /* the whole warp: a last group's spare warps */                         \
    const uint p0 = c * (SPAN_);

// One step of the online softmax for the warp's HPW heads over the TP rows at i0 of the
// chunk's n: each row's score (this lane's LT_ x LV_ latent and PT_ x PV_ rope values of
// qr . lv + qe . kv, then the warp sum; rows past n score -3e38), then mh, lh and acc
// rescaled and the rows' weighted values added. Reads qr, qe, lv, kv; updates mh, lh, acc.
#define ZMLX_MLA_FMA_HEADS(LT_, LV_, PT_, PV_)                                                    \
    ZMLX_UNROLL                                                                                   \
    for (uint j = 0; j < HPW; ++j) {                                                              \
        float sc[TP];                                                                             \
        float smax = mh[j];                                                                       \
        ZMLX_UNROLL                                                                               \
        for (uint u = 0; u < TP; ++u) {                                                           \
            float a = 0.0f;                                                                       \
            ZMLX_UNROLL                                                                           \
            for (uint t = 0; t < LT_; ++t) {                                                      \
                ZMLX_UNROLL                                                                       \
                for (uint i = 0; i < LV_; ++i) a += qr[j][t][i] * lv[u][t][i];                    \
            }                                                                                     \
            ZMLX_UNROLL                                                                           \
            for (uint t = 0; t < PT_; ++t) {                                                      \
                ZMLX_UNROLL                                                                       \
                for (uint i = 0; i < PV_; ++i) a += qe[j][t][i] * kv[u][t][i];                    \
            }                                                                                     \
            ZMLX_WARP_SUM(a);                                                                     \
            sc[u] = i0 + u < n ? a : -3.0e38f;                                                    \
            smax = ZMLX_FMAX(smax, sc[u]);                                                        \
        }                                                                                         \
        const float alpha = ZMLX_EXP(mh[j] - smax); /* 0 on the first step */                     \
        mh[j] = smax;                                                                             \
        float psum = 0.0f;                                                                        \
        ZMLX_UNROLL                                                                               \
        for (uint u = 0; u < TP; ++u) {                                                           \
            sc[u] = ZMLX_EXP(sc[u] - smax);                                                       \
            psum += sc[u];                                                                        \
        }                                                                                         \
        lh[j] = lh[j] * alpha + psum;                                                             \
        ZMLX_UNROLL                                                                               \
        for (uint t = 0; t < LT_; ++t) {                                                          \
            ZMLX_UNROLL                                                                           \
            for (uint i = 0; i < LV_; ++i) {                                                      \
                float v = acc[j][t][i] * alpha;                                                   \
                ZMLX_UNROLL                                                                       \
                for (uint u = 0; u < TP; ++u) v += sc[u] * lv[u][t][i];                           \
                acc[j][t][i] = v;                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

// Packed word u of row p of a stack of K-wide rows (words w; scales s and biases b, one per
// group of GS values) as its UV = 32 / BITS values in v, each float(q) * scale + bias rounded
// once to T (the value a cache of dtype T holds, as mx.dequantize gives it); a word past the
// row (u >= K / UV) gives zeros. mla_decode_q's loader (csrc/mla_decode_q_body.h).
template <int BITS, int GS, int K, typename T>
ZMLX_FN void zmlx_mla_dequant_word(const ZMLX_DEVICE uint* w, const ZMLX_DEVICE T* s, const ZMLX_DEVICE T* b,
                                   size_t p, uint u, ZMLX_THREAD float* v) {
    constexpr uint UV = 32 / BITS;
    constexpr uint MASK = (1u << BITS) - 1u;
    constexpr uint NW = K / UV;  // packed words per row
    uint word = 0u;
    float sc = 0.0f;
    float bi = 0.0f;
    if (u < NW) {
        const size_t gi = p * (K / GS) + (u * UV) / GS;
        word = w[p * NW + u];
        sc = static_cast<float>(s[gi]);
        bi = static_cast<float>(b[gi]);
    }
    ZMLX_UNROLL
    for (uint i = 0; i < UV; ++i) {
        const float x = static_cast<float>((word >> (BITS * i)) & MASK) * sc + bi;
        v[i] = static_cast<float>(static_cast<T>(x));
    }
}
