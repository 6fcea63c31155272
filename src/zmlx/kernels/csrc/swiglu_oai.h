// gpt-oss's expert activation, mlx-lm's compiled swiglu_oai(gate, up, alpha, limit):
//   gate = minimum(gate, limit); up = clip(up, -limit, limit)  (maximum, then minimum)
//   out = (up + 1) * (gate * sigmoid(gate * alpha))
// every op one result in T, the constants alpha, limit, -limit and 1 rounded to T first (the
// scalars of stock's graph); and SwitchLinear's bias add in T (zmlx_add).
#ifdef ZMLX_CUDA
// CUDA: MLX's own device functors, as MLX's compiled kernel runs them: bitwise stock.
template <typename T>
__device__ inline T zmlx_add(T a, T b) {
    return mlx::core::cu::Add{}(a, b);
}

template <typename T>
__device__ inline T zmlx_swiglu_oai(T g, T u, float alpha, float limit) {
    using namespace mlx::core::cu;
    const T lim = static_cast<T>(limit);
    const T up = Add{}(Minimum{}(Maximum{}(u, static_cast<T>(-limit)), lim), static_cast<T>(1.0f));
    const T gate = Minimum{}(g, lim);
    const T sig = Sigmoid{}(Multiply{}(gate, static_cast<T>(alpha)));
    return Multiply{}(up, Multiply{}(gate, sig));
}
#else
// Metal: each op in float32 rounded to T, MLX's NaN rule for minimum and maximum (a NaN first
// operand is kept); the sigmoid is not MLX's Metal one: close.
template <typename T>
inline T zmlx_add(T a, T b) {
    return static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
}

inline float zmlx_min_nan(float x, float y) {
    return metal::isnan(x) ? x : (x < y ? x : y);
}

inline float zmlx_max_nan(float x, float y) {
    return metal::isnan(x) ? x : (x > y ? x : y);
}

// a float rounded to T and back
template <typename T>
inline float zmlx_in(float v) {
    return static_cast<float>(static_cast<T>(v));
}

template <typename T>
inline T zmlx_swiglu_oai(T g, T u, float alpha, float limit) {
    const float lim = zmlx_in<T>(limit);
    // minimum and maximum of values of T are values of T: no rounding
    const float clipped = zmlx_min_nan(zmlx_max_nan(static_cast<float>(u), zmlx_in<T>(-limit)), lim);
    const float up = zmlx_in<T>(clipped + 1.0f);
    const float gate = zmlx_min_nan(static_cast<float>(g), lim);
    const float z = zmlx_in<T>(gate * zmlx_in<T>(alpha));
    const float sig = zmlx_in<T>(1.0f / (1.0f + metal::exp(-z)));
    return static_cast<T>(up * zmlx_in<T>(gate * sig));
}
#endif
