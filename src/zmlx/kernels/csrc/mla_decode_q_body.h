// mla_decode's FMA path over a quantized latent cache (mlx-lm's QuantizedKVCache: MLX's affine
// quantization, packed uint32 words of UV = 32 / BITS values, one scale and bias in T per
// group of GS values along the row). One threadgroup per (b, chunk, group of WPB * HPW heads);
// each warp on its own: HPW heads over the chunk's positions, TP at a time, with an online
// softmax (no threadgroup memory, no barriers; the warps of a group share the chunk's packed
// rows through L1). A lane holds the packed words u = lane + 32 t of each latent row (values
// UV u .. UV u + UV - 1) and of each rope row, dequantized in registers as
// float(q) * scale + bias rounded once to T (the value a cache of dtype T holds, as
// mx.dequantize gives it, and what the tensor-core path feeds its mma; a word lies in one
// group: GS is a multiple of UV) and used for both
// the scores (warp sums) and the weighted sum. The scores are scale * (q_nope . latent +
// q_pe . k_pe), scale folded into the query registers. The partials (o, m, l) have
// mla_decode's layout and chunking, so mla_unembed combines them. The context length comes
// with the cache view's shape (a kernel argument): no per-token array.
// On CUDA with bf16 activations (MMA) the chunk runs on tensor cores instead: mla_decode's
// zmlx_mla_decode_mma_rows over fragments dequantized by zmlx_mla_qrows (csrc/mla_decode_q.h).
constexpr uint UV = 32 / BITS;
constexpr uint LWN = R / UV;  // packed words per latent row
constexpr uint PWN = RD / UV;  // per rope row
constexpr uint LT = (LWN + 31) / 32;  // latent words per lane
constexpr uint PT = (PWN + 31) / 32;  // rope words per lane
const uint S = uint(lw_shape[2]);
const uint CH = zmlx_mla_chunk<MINCH, TARGET, CS>(S);
#ifdef ZMLX_CUDA
if constexpr (MMA) {  // bf16 on CUDA: mla_decode's tensor-core path over the dequantized fragments
    zmlx_mla_decode_mma_rows<H, R, RD, true>(qn, qp, zmlx_mla_qrows<R, RD, BITS, GS, T>{lw, ls, lb, pw, ps, pb},
                                             S, S, CH, ZMLX_FLOAT_BITS(SCALE_BITS), o, m, l, zmlx_gid, zmlx_lid,
                                             zmlx_lane, zmlx_warp);
    return;
}
#endif
ZMLX_MLA_FMA_GRID(CH)
const uint n = S - p0 < CH ? S - p0 : CH;
const float scale = ZMLX_FLOAT_BITS(SCALE_BITS);
const ZMLX_DEVICE uint* lwb = lw + size_t(b) * S * LWN;
const ZMLX_DEVICE T* lsb = ls + size_t(b) * S * (R / GS);
const ZMLX_DEVICE T* lbb = lb + size_t(b) * S * (R / GS);
const ZMLX_DEVICE uint* pwb = pw + size_t(b) * S * PWN;
const ZMLX_DEVICE T* psb = ps + size_t(b) * S * (RD / GS);
const ZMLX_DEVICE T* pbb = pb + size_t(b) * S * (RD / GS);
float qr[HPW][LT][UV];  // scale * q_nope (0 past the row)
float qe[HPW][PT][UV];  // scale * q_pe
float acc[HPW][LT][UV];
float mh[HPW];
float lh[HPW];
ZMLX_UNROLL
for (uint j = 0; j < HPW; ++j) {
    const size_t qh = size_t(b) * H + (hw + j < H ? hw + j : H - 1);  // a spare head repeats the last
    ZMLX_UNROLL
    for (uint t = 0; t < LT; ++t) {
        const uint u = zmlx_lane + 32 * t;
        ZMLX_UNROLL
        for (uint i = 0; i < UV; ++i) {
            qr[j][t][i] = u < LWN ? scale * static_cast<float>(qn[qh * R + u * UV + i]) : 0.0f;
            acc[j][t][i] = 0.0f;
        }
    }
    ZMLX_UNROLL
    for (uint t = 0; t < PT; ++t) {
        const uint u = zmlx_lane + 32 * t;
        ZMLX_UNROLL
        for (uint i = 0; i < UV; ++i) {
            qe[j][t][i] = u < PWN ? scale * static_cast<float>(qp[qh * RD + u * UV + i]) : 0.0f;
        }
    }
    mh[j] = -3.0e38f;
    lh[j] = 0.0f;
}
for (uint i0 = 0; i0 < n; i0 += TP) {
    float lv[TP][LT][UV];
    float kv[TP][PT][UV];
    ZMLX_UNROLL
    for (uint v = 0; v < TP; ++v) {
        const size_t p = p0 + (i0 + v < n ? i0 + v : n - 1);  // past the chunk: its last row, weight 0
        ZMLX_UNROLL
        for (uint t = 0; t < LT; ++t) {
            zmlx_mla_dequant_word<BITS, GS, R>(lwb, lsb, lbb, p, zmlx_lane + 32 * t, lv[v][t]);
        }
        ZMLX_UNROLL
        for (uint t = 0; t < PT; ++t) {
            zmlx_mla_dequant_word<BITS, GS, RD>(pwb, psb, pbb, p, zmlx_lane + 32 * t, kv[v][t]);
        }
    }
    ZMLX_MLA_FMA_HEADS(LT, UV, PT, UV)
}
ZMLX_UNROLL
for (uint j = 0; j < HPW; ++j) {
    if (hw + j < H) {
        const size_t oi = (size_t(b) * NC + c) * H + hw + j;
        ZMLX_UNROLL
        for (uint t = 0; t < LT; ++t) {
            const uint u = zmlx_lane + 32 * t;
            if (u < LWN) {
                ZMLX_UNROLL
                for (uint i = 0; i < UV; ++i) o[oi * R + u * UV + i] = acc[j][t][i];
            }
        }
        if (zmlx_lane == 0) {
            m[oi] = mh[j];
            l[oi] = lh[j];
        }
    }
}
