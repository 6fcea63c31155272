"""Shared device code for kernels that read mlx-lm's affine-quantized weights.

MLX's affine layout: each row of a (rows, cols) matrix is packed into uint32 words,
32 / bits values per word, lowest bits first; one scale and one bias per `group_size`
values of a row; a value dequantizes to `scale * q + bias`.

QDOT_HEADER defines `zmlx_qdot_lane`: this lane's float32 partial dot product of one
packed row with a vector (lanes take words lane, lane + 32, ...), and the warp sum used
to finish it. Kernels include it in their header.
"""

from __future__ import annotations

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def layout_reason(bits: int, group_size: int) -> str | None:
    """Why an affine layout is outside what the quantized kernels read, or None."""
    if bits not in BITS or group_size not in GROUP_SIZES:
        return f"affine {bits}-bit, group {group_size} (the kernels take 4/8-bit, groups 32/64/128)"
    return None


def switch_linear_reason(name: str, proj) -> str | None:
    """Why an mlx-lm expert projection cannot go through the quantized kernels, or None."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    if not isinstance(proj, QuantizedSwitchLinear):
        return f"{name} is not quantized (unquantized experts are not fused yet)"
    if proj.mode != "affine":
        return f"{name} is {proj.mode}-quantized (affine only)"
    if (why := layout_reason(proj.bits, proj.group_size)) is not None:
        return f"{name}: {why}"
    if "bias" in proj or getattr(proj, "global_scale", None) is not None:
        return f"{name} has a bias or a global scale"
    return None

QDOT_HEADER = """
#ifdef ZMLX_CUDA
#include <cooperative_groups/reduce.h>
#define ZMLX_SIMD_SUM(v) cg::reduce(cg::tiled_partition<32>(cg::this_thread_block()), (v), cg::plus<float>())
#define ZMLX_EXP(v) expf(v)
#else
#define ZMLX_SIMD_SUM(v) simd_sum(v)
#define ZMLX_EXP(v) metal::exp(v)
#endif

// w, s, b: one packed row and its scales and biases; x: the vector (cols values)
template <int BITS, int GS, int COLS, typename TS, typename TX>
inline float zmlx_qdot_lane(const ZMLX_DEVICE uint* w, const ZMLX_DEVICE TS* s,
                            const ZMLX_DEVICE TS* b, const ZMLX_DEVICE TX* x, uint lane) {
    constexpr uint PER_WORD = 32 / BITS;
    constexpr uint WORDS = COLS / PER_WORD;
    constexpr uint MASK = (1u << BITS) - 1u;
    float acc = 0.0f;
    for (uint k = lane; k < WORDS; k += 32) {
        const uint q = w[k];
        const uint g = (k * PER_WORD) / GS;
        const float sc = static_cast<float>(s[g]), bi = static_cast<float>(b[g]);
        for (uint j = 0; j < PER_WORD; ++j) {
            const float v = static_cast<float>((q >> (BITS * j)) & MASK);
            acc += (sc * v + bi) * static_cast<float>(x[k * PER_WORD + j]);
        }
    }
    return acc;
}
"""
