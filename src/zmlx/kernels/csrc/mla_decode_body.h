
// One threadgroup per (b, chunk, group of WPB * HPW heads); each warp on its own: HPW heads
// over the chunk's positions, TP at a time, with an online softmax (no threadgroup memory,
// no barriers; the warps of a group share the chunk's rows through L1). A lane holds the
// latent dims d = 4 lane + 128 t + i and the rope dims e = 2 lane + 64 t + i. The context
// length S comes with the cache view's shape (a kernel argument): no per-token array.
// With ZMLX_MLA_LEN_INPUT (mla_decode_len: a static cache's whole buffers) S is the buffers'
// capacity, which fixes the number of chunks, and only the first SL = n_valid[0] positions
// count, spread over all the chunks (zmlx_mla_span); a chunk past them writes the neutral
// partials (m -3e38, l 0, o 0), which the combine weighs 0.
constexpr uint RT = R / 128;
constexpr uint ET = RD / 64;
const uint S = uint(lat_shape[2]);
#ifdef ZMLX_MLA_LEN_INPUT
const uint SL = uint(n_valid[0]) < S ? uint(n_valid[0]) : S;
#else
const uint SL = S;
#endif
const uint CH = zmlx_mla_chunk<MINCH, TARGET, CS>(S);
#ifdef ZMLX_CUDA
if constexpr (MMA) {  // bf16 on CUDA: tensor cores (zmlx_mla_decode_mma)
    zmlx_mla_decode_mma<H, R, RD>(qv, q_pe, lat, kpe, S, SL, CH, ZMLX_FLOAT_BITS(SCALE_BITS),
                                  o, m, l, zmlx_gid, zmlx_lid, zmlx_lane, zmlx_warp);
    return;
}
#endif
const uint SPAN = zmlx_mla_span(S, SL, CH, (S + CH - 1) / CH);
ZMLX_MLA_FMA_GRID(SPAN)
const uint n = p0 < SL ? (SL - p0 < SPAN ? SL - p0 : SPAN) : 0;  // 0: a chunk past the length
const float scale = ZMLX_FLOAT_BITS(SCALE_BITS);
const ZMLX_DEVICE T* latb = lat + size_t(b) * S * R;
const ZMLX_DEVICE T* kpeb = kpe + size_t(b) * S * RD;
float qr[HPW][RT][4];  // scale * qv
float qe[HPW][ET][2];  // q_pe
float acc[HPW][RT][4];
float mh[HPW];
float lh[HPW];
ZMLX_UNROLL
for (uint j = 0; j < HPW; ++j) {
    const size_t qh = size_t(b) * H + (hw + j < H ? hw + j : H - 1);  // a spare head repeats the last
    ZMLX_UNROLL
    for (uint t = 0; t < RT; ++t) {
        ZMLX_UNROLL
        for (uint i = 0; i < 4; ++i) {
            qr[j][t][i] = scale * qv[qh * R + 4 * zmlx_lane + 128 * t + i];
            acc[j][t][i] = 0.0f;
        }
    }
    ZMLX_UNROLL
    for (uint t = 0; t < ET; ++t) {
        ZMLX_UNROLL
        for (uint i = 0; i < 2; ++i) {
            qe[j][t][i] = static_cast<float>(q_pe[qh * RD + 2 * zmlx_lane + 64 * t + i]);
        }
    }
    mh[j] = -3.0e38f;
    lh[j] = 0.0f;
}
for (uint i0 = 0; i0 < n; i0 += TP) {
    float lv[TP][RT][4];
    float kv[TP][ET][2];
    ZMLX_UNROLL
    for (uint u = 0; u < TP; ++u) {
        const size_t p = p0 + (i0 + u < n ? i0 + u : n - 1);  // past the chunk: its last row, weight 0
        ZMLX_UNROLL
        for (uint t = 0; t < RT; ++t) zmlx_mla_load4(latb + p * R + 4 * zmlx_lane + 128 * t, lv[u][t]);
        ZMLX_UNROLL
        for (uint t = 0; t < ET; ++t) zmlx_mla_load2(kpeb + p * RD + 2 * zmlx_lane + 64 * t, kv[u][t]);
    }
    ZMLX_MLA_FMA_HEADS(RT, 4, ET, 2)
}
ZMLX_UNROLL
for (uint j = 0; j < HPW; ++j) {
    if (hw + j < H) {
        const size_t oi = (size_t(b) * NC + c) * H + hw + j;
        ZMLX_UNROLL
        for (uint t = 0; t < RT; ++t) {
            ZMLX_UNROLL
            for (uint i = 0; i < 4; ++i) o[oi * R + 4 * zmlx_lane + 128 * t + i] = acc[j][t][i];
        }
        if (zmlx_lane == 0) {
            m[oi] = mh[j];
            l[oi] = lh[j];
        }
    }
}
