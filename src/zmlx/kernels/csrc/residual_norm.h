
#ifdef ZMLX_CUDA
#include <cooperative_groups/reduce.h>
#define ZMLX_SQ_ACC(acc, t) ((acc) = fmaf((t), (t), (acc)))
#define ZMLX_RSQRT(v) rsqrtf(v)
#else
#define ZMLX_SQ_ACC(acc, t) ((acc) += (t) * (t))
#define ZMLX_RSQRT(v) metal::precise::rsqrt(v)
#endif
// The RMS norm's factor in MLX's rms_norm order, from ACC, each thread's sum of squares: the
// warp sum, then the warps' sums through SUMS (32 floats of threadgroup memory; the slots of
// absent warps +0.0, as MLX zero-fills them) summed again, then INV = rsqrt(ACC / D_ + eps), eps
// a float's bits. A macro: threadgroup arrays cannot be passed to functions portably. Declares INV.
#define ZMLX_RMS_INV(INV, ACC, SUMS, D_, EPS_BITS_)                                                 \
    ACC = ZMLX_SIMD_SUM(ACC);                                                                       \
    if (zmlx_warp == 0) SUMS[zmlx_lane] = 0.0f;                                                     \
    ZMLX_BARRIER;                                                                                   \
    if (zmlx_lane == 0) SUMS[zmlx_warp] = ACC;                                                      \
    ZMLX_BARRIER;                                                                                   \
    ACC = ZMLX_SIMD_SUM(static_cast<float>(SUMS[zmlx_lane]));                                       \
    const float INV = ZMLX_RSQRT(ZMLX_ADD(ACC / static_cast<float>(D_), ZMLX_FLOAT_BITS(EPS_BITS_)))
