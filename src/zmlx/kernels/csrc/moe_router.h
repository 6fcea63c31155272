
inline float zmlx_sigmoid(float x) {
#ifdef ZMLX_CUDA
    const float y = 1.0f / (1.0f + expf(fabsf(x)));
#else
    const float y = 1.0f / (1.0f + metal::exp(metal::abs(x)));
#endif
    return (x < 0) ? y : 1.0f - y;
}
// a comes before b in MLX's ascending sort of -score (NaN sorts last)
inline bool zmlx_before(float a, float b) {
    const float na = -a, nb = -b;
    const bool an = na != na, bn = nb != nb;
    if (an || bn) return !an && bn;
    return na < nb;
}
