// mla_decode's tensor-core path (CUDA only), apart from mla.h so that the kernels that do not
// decode (mla_q_prep, mla_embed_q, mla_unembed) do not compile it. Included after mla.h by
// mla_decode, mla_decode_len and mla_decode_q.
#ifdef ZMLX_CUDA
ZMLX_FN void zmlx_mma_bf16(float* c, const uint* a, const uint* b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
ZMLX_FN uint zmlx_movmatrix_t(uint a) {  // the transpose of an 8x8 b16 fragment
    uint d;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a));
    return d;
}
// The A fragments of positions t0 .. t0 + 15 of a chunk (rows past its n positions repeat
// its last one, weight 0): the warp's 64 latent dims (4 k-steps of 16) and, if `rope`, its
// rope k-step.
template <int R, int RD, typename TT>
ZMLX_FN void zmlx_mla_fragments(const TT* latb, const TT* kpeb, uint p0, uint n, uint t0, uint g, bool rope,
                                uint (&la)[4][4], uint (&ka)[4]) {
    const size_t r0 = p0 + (t0 + g < n ? t0 + g : n - 1);
    const size_t r1 = p0 + (t0 + g + 8 < n ? t0 + g + 8 : n - 1);
    ZMLX_UNROLL
    for (uint ks = 0; ks < 4; ++ks) {
        la[ks][0] = *reinterpret_cast<const uint*>(latb + r0 * R + 16 * ks);
        la[ks][1] = *reinterpret_cast<const uint*>(latb + r1 * R + 16 * ks);
        la[ks][2] = *reinterpret_cast<const uint*>(latb + r0 * R + 16 * ks + 8);
        la[ks][3] = *reinterpret_cast<const uint*>(latb + r1 * R + 16 * ks + 8);
    }
    ka[0] = ka[1] = ka[2] = ka[3] = 0u;
    if (rope) {
        ka[0] = *reinterpret_cast<const uint*>(kpeb + r0 * RD);
        ka[1] = *reinterpret_cast<const uint*>(kpeb + r1 * RD);
        ka[2] = *reinterpret_cast<const uint*>(kpeb + r0 * RD + 8);
        ka[3] = *reinterpret_cast<const uint*>(kpeb + r1 * RD + 8);
    }
}
// Where zmlx_mla_decode_mma_rows reads the cache's rows from: `start` once per threadgroup
// (batch row b of S positions, warp w, lane's tg), then `fragments` per 16 positions (as
// zmlx_mla_fragments). This one: bf16 buffers read as they are.
template <int R, int RD, typename TT>
struct zmlx_mla_bf16_rows {
    const TT* lat;
    const TT* kpe;
    ZMLX_FN void start(uint b, uint S, uint w, uint tg) {
        lat += size_t(b) * S * R + 64 * w + 2 * tg;
        kpe += size_t(b) * S * RD + 16 * w + 2 * tg;
    }
    ZMLX_FN void fragments(uint p0, uint n, uint t0, uint g, bool rope, uint (&la)[4][4], uint (&ka)[4]) const {
        zmlx_mla_fragments<R, RD>(lat, kpe, p0, n, t0, g, rope, la, ka);
    }
};
// Tensor-core path (CUDA, bf16 cache): one threadgroup of R / 64 warps per (b, chunk) of the
// S buffered positions, SL <= S of them valid (spread over the chunks by zmlx_mla_span; a chunk
// past them writes the neutral partials), warp
// w owning latent dims 64 w .. 64 w + 63, 16 positions per step. Scores S[p][h] =
// L[p][d] Q^T[d][h] by mma.m16n8k16 (A = the latent rows as loaded, B = scale * qv split
// into bf16 hi + lo, so the product keeps ~16 mantissa bits; the rope part by warps
// 0 .. RD / 16 - 1), the warps' partial scores summed in threadgroup memory, an online
// softmax one warp per head, then O^T[d][h] += L^T[d][p] P^T[p][h] (A = the same latent
// fragments transposed in registers by movmatrix, B = P split into bf16 hi + lo).
// Instantiated only for bf16 (MMA = 1); TT is a template so other dtypes compile.
// The rows come from ROWS (zmlx_mla_bf16_rows, or mla_decode_q's dequantizing loader); qv is
// float32 or the activations' dtype (QT); with PE_LO, q_pe is not yet scaled: scale * q_pe is
// split into bf16 hi + lo as qv is (one more rope mma), else q_pe's own bf16 bits are B.
template <int H, int R, int RD, bool PE_LO, typename QT, typename PT, typename ROWS>
__device__ void zmlx_mla_decode_mma_rows(const QT* qv, const PT* q_pe, ROWS rows, uint S, uint SL, uint CH,
                                         float scale, float* o, float* m, float* l, uint gid, uint lid,
                                         uint lane, uint warp) {
    constexpr uint NW = R / 64;
    constexpr uint NT8 = (H + 7) / 8;  // head tiles of 8
    constexpr uint HP = NT8 * 8;
    constexpr uint RK = RD / 16;  // rope k-steps
    __shared__ float red[NW][16][HP];
    __shared__ float sp[HP][17];
    __shared__ float ms[HP];
    __shared__ float ls[HP];
    __shared__ float al[HP];
    __shared__ float ost[NW][8][68];
    const uint NC = (S + CH - 1) / CH;
    const uint c = gid % NC;
    const uint b = gid / NC;
    const uint span = zmlx_mla_span(S, SL, CH, NC);
    const uint p0 = c * span;
    const uint n = p0 < SL ? (SL - p0 < span ? SL - p0 : span) : 0;  // 0: a chunk past the length
    const uint g = lane / 4;
    const uint tg = lane % 4;
    const uint w = warp;
    rows.start(b, S, w, tg);
    uint qh[4][NT8][2];
    uint ql[4][NT8][2];
    uint qr[NT8][2];
    uint qrl[NT8][2];  // PE_LO: scale * q_pe's lo part
    ZMLX_UNROLL
    for (uint nt = 0; nt < NT8; ++nt) {
        const uint h = 8 * nt + g;
        ZMLX_UNROLL
        for (uint r = 0; r < 2; ++r) {
            ZMLX_UNROLL
            for (uint ks = 0; ks < 4; ++ks) {
                const uint k = 64 * w + 16 * ks + 8 * r + 2 * tg;
                float x[2] = {0.0f, 0.0f};
                if (h < H) zmlx_mla_load2(qv + (size_t(b) * H + h) * R + k, x);
                const float x0 = scale * x[0];
                const float x1 = scale * x[1];
                const __nv_bfloat162 hi = __floats2bfloat162_rn(x0, x1);
                const __nv_bfloat162 lo = __floats2bfloat162_rn(x0 - __low2float(hi), x1 - __high2float(hi));
                qh[ks][nt][r] = *reinterpret_cast<const uint*>(&hi);
                ql[ks][nt][r] = *reinterpret_cast<const uint*>(&lo);
            }
            qr[nt][r] = 0u;
            qrl[nt][r] = 0u;
            if (w < RK && h < H) {
                const PT* qp = q_pe + (size_t(b) * H + h) * RD + 16 * w + 8 * r + 2 * tg;
                if constexpr (PE_LO) {
                    float e[2];
                    zmlx_mla_load2(qp, e);
                    const __nv_bfloat162 hi = __floats2bfloat162_rn(scale * e[0], scale * e[1]);
                    const __nv_bfloat162 lo = __floats2bfloat162_rn(scale * e[0] - __low2float(hi),
                                                                    scale * e[1] - __high2float(hi));
                    qr[nt][r] = *reinterpret_cast<const uint*>(&hi);
                    qrl[nt][r] = *reinterpret_cast<const uint*>(&lo);
                } else {
                    qr[nt][r] = *reinterpret_cast<const uint*>(qp);
                }
            }
        }
    }
    if (lid < HP) {
        ms[lid] = -3.0e38f;
        ls[lid] = 0.0f;
        al[lid] = 1.0f;
    }
    float acc[4][NT8][4];
    ZMLX_UNROLL
    for (uint mt = 0; mt < 4; ++mt) {
        ZMLX_UNROLL
        for (uint nt = 0; nt < NT8; ++nt) {
            ZMLX_UNROLL
            for (uint e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
        }
    }
    __syncthreads();
    // the latent (and rope) fragments of the next 16 positions load while this step computes
    uint la[4][4];
    uint ka[4];
    if (n > 0) rows.fragments(p0, n, 0, g, w < RK, la, ka);
    for (uint t0 = 0; t0 < n; t0 += 16) {
        uint nla[4][4];
        uint nka[4];
        if (t0 + 16 < n) rows.fragments(p0, n, t0 + 16, g, w < RK, nla, nka);
        float sc[NT8][4];
        ZMLX_UNROLL
        for (uint nt = 0; nt < NT8; ++nt) {
            ZMLX_UNROLL
            for (uint e = 0; e < 4; ++e) sc[nt][e] = 0.0f;
            ZMLX_UNROLL
            for (uint ks = 0; ks < 4; ++ks) {
                zmlx_mma_bf16(sc[nt], la[ks], qh[ks][nt]);
                zmlx_mma_bf16(sc[nt], la[ks], ql[ks][nt]);
            }
        }
        if (w < RK) {
            ZMLX_UNROLL
            for (uint nt = 0; nt < NT8; ++nt) {
                zmlx_mma_bf16(sc[nt], ka, qr[nt]);
                if constexpr (PE_LO) zmlx_mma_bf16(sc[nt], ka, qrl[nt]);
            }
        }
        ZMLX_UNROLL
        for (uint nt = 0; nt < NT8; ++nt) {
            red[w][g][8 * nt + 2 * tg] = sc[nt][0];
            red[w][g][8 * nt + 2 * tg + 1] = sc[nt][1];
            red[w][g + 8][8 * nt + 2 * tg] = sc[nt][2];
            red[w][g + 8][8 * nt + 2 * tg + 1] = sc[nt][3];
        }
        __syncthreads();
        for (uint i = lid; i < 16 * HP; i += NW * 32) {
            const uint p = i / HP;
            const uint h = i % HP;
            float v = 0.0f;
            ZMLX_UNROLL
            for (uint ww = 0; ww < NW; ++ww) v += red[ww][p][h];
            sp[h][p] = t0 + p < n ? v : -3.0e38f;
        }
        __syncthreads();
        for (uint h = w; h < H; h += NW) {  // lanes 16..31 mirror lanes 0..15
            const uint p = lane % 16;
            const float s = sp[h][p];
            float tmax = s;
            ZMLX_UNROLL
            for (uint mk = 8; mk > 0; mk /= 2) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, mk));
            const float mold = ms[h];
            const float mnew = fmaxf(mold, tmax);
            const float e = expf(s - mnew);
            float sum = e;
            ZMLX_UNROLL
            for (uint mk = 8; mk > 0; mk /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, mk);
            __syncwarp();
            if (lane < 16) sp[h][p] = e;
            if (lane == 0) {
                const float a = expf(mold - mnew);
                al[h] = a;
                ls[h] = ls[h] * a + sum;
                ms[h] = mnew;
            }
        }
        __syncthreads();
        uint ph[NT8][2];
        uint pl[NT8][2];
        ZMLX_UNROLL
        for (uint nt = 0; nt < NT8; ++nt) {
            const float a0 = al[8 * nt + 2 * tg];
            const float a1 = al[8 * nt + 2 * tg + 1];
            ZMLX_UNROLL
            for (uint mt = 0; mt < 4; ++mt) {
                acc[mt][nt][0] *= a0;
                acc[mt][nt][1] *= a1;
                acc[mt][nt][2] *= a0;
                acc[mt][nt][3] *= a1;
            }
            ZMLX_UNROLL
            for (uint r = 0; r < 2; ++r) {
                const float x0 = sp[8 * nt + g][8 * r + 2 * tg];
                const float x1 = sp[8 * nt + g][8 * r + 2 * tg + 1];
                const __nv_bfloat162 hi = __floats2bfloat162_rn(x0, x1);
                const __nv_bfloat162 lo = __floats2bfloat162_rn(x0 - __low2float(hi), x1 - __high2float(hi));
                ph[nt][r] = *reinterpret_cast<const uint*>(&hi);
                pl[nt][r] = *reinterpret_cast<const uint*>(&lo);
            }
        }
        ZMLX_UNROLL
        for (uint mt = 0; mt < 4; ++mt) {
            uint at[4];
            at[0] = zmlx_movmatrix_t(la[mt][0]);
            at[1] = zmlx_movmatrix_t(la[mt][2]);
            at[2] = zmlx_movmatrix_t(la[mt][1]);
            at[3] = zmlx_movmatrix_t(la[mt][3]);
            ZMLX_UNROLL
            for (uint nt = 0; nt < NT8; ++nt) {
                zmlx_mma_bf16(acc[mt][nt], at, ph[nt]);
                zmlx_mma_bf16(acc[mt][nt], at, pl[nt]);
            }
        }
        ZMLX_UNROLL
        for (uint ks = 0; ks < 4; ++ks) {
            ZMLX_UNROLL
            for (uint e = 0; e < 4; ++e) la[ks][e] = nla[ks][e];
        }
        ZMLX_UNROLL
        for (uint e = 0; e < 4; ++e) ka[e] = nka[e];
    }
    // o: each warp's 8 heads x 64 dims at a time through threadgroup memory (rows of 68
    // floats: conflict-free writes), then float4 stores, two rows per warp instruction
    ZMLX_UNROLL
    for (uint nt = 0; nt < NT8; ++nt) {
        ZMLX_UNROLL
        for (uint mt = 0; mt < 4; ++mt) {
            ZMLX_UNROLL
            for (uint e = 0; e < 2; ++e) {
                ost[w][2 * tg + e][16 * mt + g] = acc[mt][nt][e];
                ost[w][2 * tg + e][16 * mt + g + 8] = acc[mt][nt][2 + e];
            }
        }
        __syncwarp();
        ZMLX_UNROLL
        for (uint i = 0; i < 4; ++i) {
            const uint hl = 2 * i + lane / 16;
            const uint h = 8 * nt + hl;
            const uint d4 = 4 * (lane % 16);
            if (h < H) {
                const float4 v = make_float4(ost[w][hl][d4], ost[w][hl][d4 + 1], ost[w][hl][d4 + 2],
                                             ost[w][hl][d4 + 3]);
                *reinterpret_cast<float4*>(o + ((size_t(b) * NC + c) * H + h) * R + 64 * w + d4) = v;
            }
        }
        __syncwarp();
    }
    if (lid < H) {
        m[(size_t(b) * NC + c) * H + lid] = ms[lid];
        l[(size_t(b) * NC + c) * H + lid] = ls[lid];
    }
}
// mla_decode's tensor-core path: the cache's bf16 buffers, qv float32, q_pe already scaled.
template <int H, int R, int RD, typename TT>
__device__ void zmlx_mla_decode_mma(const float* qv, const TT* q_pe, const TT* lat, const TT* kpe,
                                    uint S, uint SL, uint CH, float scale, float* o, float* m, float* l,
                                    uint gid, uint lid, uint lane, uint warp) {
    zmlx_mla_decode_mma_rows<H, R, RD, false>(qv, q_pe, zmlx_mla_bf16_rows<R, RD, TT>{lat, kpe}, S, SL, CH,
                                              scale, o, m, l, gid, lid, lane, warp);
}
#endif
