
#ifdef ZMLX_METAL
// Metal's row dot in norm_qkv_a_body.h is written once for packed rows (uint32 words) and
// unquantized rows (values of T): both branches must compile for both weight types, and
// only the one BITS names runs. A weight read as a packed word: itself when packed; 0 for a
// value of T (that branch never runs), so no conversion of T to uint is asked of Metal.
template <typename W>
inline uint zmlx_packed_word(W) {
    return 0u;
}
inline uint zmlx_packed_word(uint w) { return w; }
#endif
