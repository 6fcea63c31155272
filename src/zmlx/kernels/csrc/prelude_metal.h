#define ZMLX_METAL 1
#define ZMLX_MUL(a, b) ((a) * (b))
#define ZMLX_ADD(a, b) ((a) + (b))
#define ZMLX_SHARED threadgroup
#define ZMLX_BARRIER threadgroup_barrier(mem_flags::mem_threadgroup)
#define ZMLX_FLOAT_BITS(i) as_type<float>(int(i))
#define ZMLX_SHFL_XOR(v, m) simd_shuffle_xor((v), (m))
#define ZMLX_DEVICE device
