// qk_norm_rope: one threadgroup of TG threads per head of a token, B * (H + HK) groups; group g
// is token g / (H + HK) and head g % (H + HK): the H query heads of q, then the HK key heads at
// the start of kv's row (its values follow them; they are not read).
// 1. the head's D values: the sum of squares in MLX's rms_norm order, as norm_qkv_a_body.h
//    (threads below BLOCK own the elements MLX's threads own; threads from BLOCK on sum +0.0
//    into the slots MLX zero-fills).
// 2. xn = w * T(x * rsqrt(mean + eps)) into zmlx_xn, rounded to T as stock's norm writes it
//    (each element read and written by the one thread that owns it).
// 3. thread i < D / 2 rotates the pair (i, i + D / 2) (nn.RoPE, traditional False) by the
//    position's (cos, sin), row `cs` of the table (pair i at 2i, 2i + 1), each result rounded
//    to T: stock's rope of its norm's output (csrc/glm47_rope.h's rotation).
#ifdef ZMLX_CUDA
#define ZMLX_SIMD_SUM(v) cg::reduce(cg::tiled_partition<32>(cg::this_thread_block()), (v), cg::plus<float>())
#else
#define ZMLX_SIMD_SUM(v) simd_sum(v)
#endif
const uint token = zmlx_gid / (H + HK);
const uint head = zmlx_gid % (H + HK);
const bool is_q = head < H;
const size_t src = is_q ? (size_t(token) * H + head) * D : size_t(token) * KVW + size_t(head - H) * D;
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
                const T xv = is_q ? q[src + d] : kv[src + d];
                zmlx_xn[d] = xv;
                const float t = static_cast<float>(xv);
                ZMLX_SQ_ACC(acc, t);
            }
        }
    }
}
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
ZMLX_BARRIER;
if (zmlx_lid < D / 2) {
    const uint i = zmlx_lid;
    const float c = cs[2 * i];
    const float s = cs[2 * i + 1];
    const float x1 = static_cast<float>(static_cast<T>(zmlx_xn[i]));
    const float x2 = static_cast<float>(static_cast<T>(zmlx_xn[i + D / 2]));
    const T r1 = static_cast<T>(ZMLX_ROPE_X1(x1, x2, c, s));
    const T r2 = static_cast<T>(ZMLX_ROPE_X2(x1, x2, c, s));
    if (is_q) {
        const size_t dst = (size_t(token) * H + head) * D;
        q_out[dst + i] = r1;
        q_out[dst + i + D / 2] = r2;
    } else {
        const size_t dst = (size_t(token) * HK + (head - H)) * D;
        k_out[dst + i] = r1;
        k_out[dst + i + D / 2] = r2;
    }
}
