#ifdef ZMLX_CUDA
// mla_decode_q's tensor-core path (CUDA, bf16): zmlx_mla_decode_mma_rows reads the packed cache
// through this loader, which dequantizes each fragment's two values in registers as
// float(q) * scale + bias rounded to bf16 (what mx.dequantize holds in a bf16 cache), so
// the mma path runs unchanged on the dequantized rows. A fragment's 2 values at an even dim
// lie in one packed word (UV = 32 / BITS >= 4 values) and one group (GS a multiple of 16:
// the 16 dims of a k-step share a group).
template <int R, int RD, int BITS, int GS, typename TT>
struct zmlx_mla_qrows {
    const uint* lw;
    const TT* ls;
    const TT* lb;
    const uint* pw;
    const TT* ps;
    const TT* pb;
    uint w64 = 0;  // this warp's first latent dim: 64 w (its rope dims start at 16 w)
    uint lo = 0;  // this lane's offset in a k-step's 8 dims: 2 tg
    ZMLX_FN void start(uint b, uint S, uint w, uint tg) {
        constexpr uint UV = 32 / BITS;
        lw += size_t(b) * S * (R / UV);
        ls += size_t(b) * S * (R / GS);
        lb += size_t(b) * S * (R / GS);
        pw += size_t(b) * S * (RD / UV);
        ps += size_t(b) * S * (RD / GS);
        pb += size_t(b) * S * (RD / GS);
        w64 = 64 * w;
        lo = 2 * tg;
    }
    // Values d, d + 1 (d = d16 + lo) of row `row` (K values) as a bf16 pair: the fragment
    // register's bits. d16 is a k-step's first dim (a multiple of 8) and grp its group,
    // computed by the caller from the warp and the unrolled k-step, so that the k-steps of one
    // group read one scale and bias (the same address: loaded once).
    template <int K>
    ZMLX_FN uint pair(const uint* w, const TT* s, const TT* b, size_t row, uint d16, uint grp) const {
        constexpr uint UV = 32 / BITS;
        constexpr uint MASK = (1u << BITS) - 1u;
        const uint d = d16 + lo;
        const uint word = w[row * (K / UV) + d / UV];
        const float sc = static_cast<float>(s[row * (K / GS) + grp]);
        const float bi = static_cast<float>(b[row * (K / GS) + grp]);
        const uint sh = BITS * (d % UV);
        const __nv_bfloat162 v = __floats2bfloat162_rn(static_cast<float>((word >> sh) & MASK) * sc + bi,
                                                       static_cast<float>((word >> (sh + BITS)) & MASK) * sc + bi);
        return *reinterpret_cast<const uint*>(&v);
    }
    // zmlx_mla_fragments' registers, from the packed rows
    ZMLX_FN void fragments(uint p0, uint n, uint t0, uint g, bool rope, uint (&la)[4][4], uint (&ka)[4]) const {
        const size_t r0 = p0 + (t0 + g < n ? t0 + g : n - 1);
        const size_t r1 = p0 + (t0 + g + 8 < n ? t0 + g + 8 : n - 1);
        const uint w = w64 / 64;
        ZMLX_UNROLL
        for (uint ks = 0; ks < 4; ++ks) {
            const uint grp = w * (64 / GS) + (16 * ks) / GS;  // a k-step's 16 dims lie in one group
            la[ks][0] = pair<R>(lw, ls, lb, r0, w64 + 16 * ks, grp);
            la[ks][1] = pair<R>(lw, ls, lb, r1, w64 + 16 * ks, grp);
            la[ks][2] = pair<R>(lw, ls, lb, r0, w64 + 16 * ks + 8, grp);
            la[ks][3] = pair<R>(lw, ls, lb, r1, w64 + 16 * ks + 8, grp);
        }
        ka[0] = ka[1] = ka[2] = ka[3] = 0u;
        if (rope) {
            const uint grp = (16 * w) / GS;
            ka[0] = pair<RD>(pw, ps, pb, r0, 16 * w, grp);
            ka[1] = pair<RD>(pw, ps, pb, r1, 16 * w, grp);
            ka[2] = pair<RD>(pw, ps, pb, r0, 16 * w + 8, grp);
            ka[3] = pair<RD>(pw, ps, pb, r1, 16 * w + 8, grp);
        }
    }
};
#endif
