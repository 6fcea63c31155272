
#ifdef ZMLX_CUDA
#define ZMLX_ROPE_X1(x1, x2, c, s) fmaf((x1), (c), -__fmul_rn((x2), (s)))
#define ZMLX_ROPE_X2(x1, x2, c, s) fmaf((x1), (s), __fmul_rn((x2), (c)))
#else
#define ZMLX_ROPE_X1(x1, x2, c, s) ((x1) * (c) - (x2) * (s))
#define ZMLX_ROPE_X2(x1, x2, c, s) ((x1) * (s) + (x2) * (c))
#endif
