// qk_norm_rope: one threadgroup of TG threads per head of a token, B * (H + HK) groups; group g
// is token g / (H + HK) and head g % (H + HK): the H query heads of q, then the HK key heads at
// the start of kv's row (its values follow them; they are not read).
// 0. BIAS: each value plus its projection's bias, rounded to T (stock's `x + bias` after the
//    quantized matmul; one rounding of a float32 sum, as MLX's add of two values of T).
// 1. NORM: the head's D values' sum of squares in MLX's rms_norm order, as norm_qkv_a_body.h
//    (threads below BLOCK own the elements MLX's threads own; threads from BLOCK on sum +0.0
//    into the slots MLX zero-fills), then xn = w * T(x * rsqrt(mean + eps)) in zmlx_xn,
//    rounded to T as stock's norm writes it (each element read and written by its owner).
// 2. the rope (nn.RoPE, traditional False) of the first RD values: pair (i, i + RD / 2) turned
//    by the position's (cos, sin), row `cs` of the table (pair i at 2i, 2i + 1), each result
//    rounded to T (csrc/glm47_rope.h's rotation); values from RD on are copied, as stock's
//    rope of fewer dims than the head leaves them. YaRN (MSCALE_BITS not 1.0): the rotated
//    values are first scaled in T as YarnRoPE scales its input (glm47_rope.h's ZMLX_ROPE_IN).
#ifdef ZMLX_CUDA
#define ZMLX_SIMD_SUM(v) cg::reduce(cg::tiled_partition<32>(cg::this_thread_block()), (v), cg::plus<float>())
#else
#define ZMLX_SIMD_SUM(v) simd_sum(v)
#endif
const uint token = zmlx_gid / (H + HK);
const uint head = zmlx_gid % (H + HK);
const bool is_q = head < H;
const uint hrow = is_q ? head : head - H;  // the head within q or within the keys
const size_t src = is_q ? (size_t(token) * H + head) * D : size_t(token) * KVW + size_t(hrow) * D;
ZMLX_SHARED float zmlx_sums[32];
#ifdef ZMLX_CUDA
__shared__ __align__(16) T zmlx_xn[D];
#else
threadgroup T zmlx_xn[D];
#endif
float acc = 0.0f;
if (zmlx_lid < BLOCK) {
    for (uint i = 0; i < CHUNKS; ++i) {
        for (uint j = 0; j < NR; ++j) {
            const uint d = (BLOCK * i + zmlx_lid) * NR + j;
            if (d < D) {
                T xv = is_q ? q[src + d] : kv[src + d];
                if (BIAS) {
                    const float bv = static_cast<float>(is_q ? q_bias[hrow * D + d] : k_bias[hrow * D + d]);
                    xv = static_cast<T>(ZMLX_ADD(static_cast<float>(xv), bv));
                }
                zmlx_xn[d] = xv;
                const float t = static_cast<float>(xv);
                ZMLX_SQ_ACC(acc, t);
            }
        }
    }
}
if (NORM) {
    ZMLX_RMS_INV(inv, acc, zmlx_sums, D, (is_q ? EPS_Q_BITS : EPS_K_BITS));  // csrc/residual_norm.h
    if (zmlx_lid < BLOCK) {
        for (uint i = 0; i < CHUNKS; ++i) {
            for (uint j = 0; j < NR; ++j) {
                const uint d = (BLOCK * i + zmlx_lid) * NR + j;
                if (d < D) {
                    const float w = static_cast<float>(is_q ? q_norm_w[d] : k_norm_w[d]);
                    const T y = static_cast<T>(ZMLX_MUL(static_cast<float>(static_cast<T>(zmlx_xn[d])), inv));
                    zmlx_xn[d] = static_cast<T>(ZMLX_MUL(w, static_cast<float>(y)));
                }
            }
        }
    }
}
ZMLX_BARRIER;
const size_t dst = is_q ? (size_t(token) * H + head) * D : (size_t(token) * HK + hrow) * D;
for (uint d = zmlx_lid; d < D; d += TG) {
    if (d < RD / 2) {
        const float c = cs[2 * d];
        const float s = cs[2 * d + 1];
        const float x1 = ZMLX_ROPE_IN(static_cast<float>(static_cast<T>(zmlx_xn[d])));
        const float x2 = ZMLX_ROPE_IN(static_cast<float>(static_cast<T>(zmlx_xn[d + RD / 2])));
        const T r1 = static_cast<T>(ZMLX_ROPE_X1(x1, x2, c, s));
        const T r2 = static_cast<T>(ZMLX_ROPE_X2(x1, x2, c, s));
        if (is_q) {
            q_out[dst + d] = r1;
            q_out[dst + d + RD / 2] = r2;
        } else {
            k_out[dst + d] = r1;
            k_out[dst + d + RD / 2] = r2;
        }
    } else if (d >= RD) {
        if (is_q) {
            q_out[dst + d] = zmlx_xn[d];
        } else {
            k_out[dst + d] = zmlx_xn[d];
        }
    }
}
