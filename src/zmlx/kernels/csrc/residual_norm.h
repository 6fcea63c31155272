
#ifdef ZMLX_CUDA
#include <cooperative_groups/reduce.h>
#define ZMLX_SQ_ACC(acc, t) ((acc) = fmaf((t), (t), (acc)))
#define ZMLX_RSQRT(v) rsqrtf(v)
#else
#define ZMLX_SQ_ACC(acc, t) ((acc) += (t) * (t))
#define ZMLX_RSQRT(v) metal::precise::rsqrt(v)
#endif
