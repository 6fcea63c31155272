inline float zmlx_sigmoid(float x) {
#ifdef ZMLX_CUDA
    const float y = 1.0f / (1.0f + expf(fabsf(x)));
#else
    const float y = 1.0f / (1.0f + metal::exp(metal::abs(x)));
#endif
    return (x < 0) ? y : 1.0f - y;
}
// a comes before b in MLX's ascending sort (NaN sorts last: the largest)
inline bool zmlx_less(float a, float b) {
    const bool an = a != a, bn = b != b;
    if (an || bn) return !an && bn;
    return a < b;
}
// a comes before b in MLX's ascending sort of -score (NaN sorts last: picked last)
inline bool zmlx_before(float a, float b) {
    return zmlx_less(-a, -b);
}
// The two largest values seen, in MLX's sort order (NaN the largest), largest first. Values
// only: their sum is all the group step reads. -inf starts it: a group holds >= 2 experts,
// so a start value left in the pair can only equal the experts' own (-inf).
struct ZmlxTop2 {
    float first, second;
};
inline ZmlxTop2 zmlx_top2_add(ZmlxTop2 t, float first, float second) {
    if (zmlx_less(t.first, first)) {
        t.second = zmlx_less(t.first, second) ? second : t.first;
        t.first = first;
    } else if (zmlx_less(t.second, first)) {
        t.second = first;
    }
    return t;
}
