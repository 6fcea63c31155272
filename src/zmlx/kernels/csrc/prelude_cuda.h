#define ZMLX_CUDA 1
typedef unsigned int uint;
#define ZMLX_MUL(a, b) __fmul_rn((a), (b))
#define ZMLX_ADD(a, b) __fadd_rn((a), (b))
#define ZMLX_SHARED __shared__
#define ZMLX_BARRIER __syncthreads()
#define ZMLX_FLOAT_BITS(i) __int_as_float(i)
#define ZMLX_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define ZMLX_DEVICE
