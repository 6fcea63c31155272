
#ifdef ZMLX_CUDA
#define ZMLX_ROPE_X1(x1, x2, c, s) fmaf((x1), (c), -__fmul_rn((x2), (s)))
#define ZMLX_ROPE_X2(x1, x2, c, s) fmaf((x1), (s), __fmul_rn((x2), (c)))
#else
#define ZMLX_ROPE_X1(x1, x2, c, s) ((x1) * (c) - (x2) * (s))
#define ZMLX_ROPE_X2(x1, x2, c, s) ((x1) * (s) + (x2) * (c))
#endif
// The value the rope rotates, from x read as float. YaRN's rope (mlx-lm's YarnRoPE) multiplies
// x by its mscale in T before mx.fast.rope (`x.at[..., :dims].multiply(mscale)`, the Python
// float rounded to T first): float(T(x * T(mscale))), one rounding, since the product of two
// values of T is exact in float32. MSCALE_BITS holds float(T(mscale)); at 1.0 (plain RoPE, or
// YaRN with mscale == mscale_all_dim, where stock multiplies by nothing) x is taken as read.
// Needs T and MSCALE_BITS from the kernel that uses it.
#define ZMLX_ROPE_IN(v) \
    (MSCALE_BITS == 0x3f800000 ? (v) : static_cast<float>(static_cast<T>(ZMLX_MUL((v), ZMLX_FLOAT_BITS(MSCALE_BITS)))))
