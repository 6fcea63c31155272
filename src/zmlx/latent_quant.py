"""A quantized MLA latent cache: what it supports, the attention that reads it, its bytes.

mlx-lm's `QuantizedKVCache` (what `--kv-bits` / `kv_bits` make through
`maybe_quantize_kv_cache`) holds MLA's latent as its keys and the roped k_pe as its values,
each as MLX's affine quantization (packed uint32, scales, biases; group along the last axis).
`latent_attention` is the plain-MLX reference of the decode attention over it: it
dequantizes the cached triples and runs mlx-lm's attention math in mlx-lm's order (the CPU's
path). The fused kernel, zmlx.kernels.mla_decode_q, takes the same arguments (the quantized
arrays, not dequantized ones) and dequantizes in registers; its tests hold it at least as
close to a float32 truth as this reference.
"""

from __future__ import annotations

from typing import Any, Iterable

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import QuantizedKVCache

# The bits and group sizes the quantized latent attention supports (what a fused kernel reads).
BITS = (4, 8)
GROUP_SIZES = (32, 64)

Quantized = tuple[mx.array, mx.array, mx.array]  # (packed uint32, scales, biases)


def kv_quant_error(bits: int | None, group_size: int | None) -> str | None:
    """Why an MLA latent cache cannot be quantized with these settings, or None."""
    if bits is not None and bits not in BITS:
        return f"--kv-bits {bits} is not supported for an MLA latent cache (supported: 4, 8)"
    if group_size is not None and group_size not in GROUP_SIZES:
        return f"--kv-group-size {group_size} is not supported for an MLA latent cache (supported: 32, 64)"
    return None


def is_quantized(cache: Any) -> bool:
    """Whether `cache` is mlx-lm's quantized KV cache (its update_and_fetch returns triples)."""
    return isinstance(cache, QuantizedKVCache)


def dequantize(parts: Quantized, *, group_size: int, bits: int) -> mx.array:
    """MLX's affine dequantization of one cached triple (in the scales' dtype)."""
    return mx.dequantize(*parts, group_size=group_size, bits=bits)


def latent_attention(
    q_nope: mx.array,
    q_pe: mx.array,
    latent: Quantized,
    pe: Quantized,
    *,
    scale: float,
    mask: mx.array | None,
    group_size: int,
    bits: int,
) -> mx.array:
    """Reference of MLA's decode attention over a quantized latent cache.

    q_nope: (B, H, L, R) already absorbed by embed_q; q_pe: (B, H, L, P) roped, not scaled;
    latent, pe: the cache's triples of (B, 1, T, R) and (B, 1, T, P); mask: None or a bool
    (.., L, T) mask. Returns (B, H, L, R), before unembed_out. mlx-lm's order: the rope
    scores (q_pe * scale) @ k_pe^T become the additive mask of an attention whose keys and
    values are both the latent."""
    kv_latent = dequantize(latent, group_size=group_size, bits=bits)
    k_pe = dequantize(pe, group_size=group_size, bits=bits)
    pe_scores = (q_pe * scale) @ k_pe.swapaxes(-1, -2)
    if mask is not None:
        pe_scores = mx.where(mask, pe_scores, mx.array(mx.finfo(pe_scores.dtype).min, pe_scores.dtype))
    return mx.fast.scaled_dot_product_attention(q_nope, kv_latent, kv_latent, scale=scale, mask=pe_scores)


def cache_bytes(caches: Iterable[Any]) -> int:
    """Bytes of the arrays that hold the cached positions of every layer's cache (what the
    cache costs per sequence at its current length; the buffers' unused tail, at most one
    allocation step, is not counted)."""
    total = 0
    for c in caches:
        if getattr(c, "keys", None) is None:
            continue
        held = c.keys_and_values() if hasattr(c, "keys_and_values") else c.state
        arrays = [item[1] for item in tree_flatten(held) if isinstance(item[1], mx.array)]
        total += sum(a.nbytes for a in arrays)
    return total


def update_and_fetch(
    cache: QuantizedKVCache, keys: mx.array, values: mx.array
) -> tuple[Quantized, Quantized]:
    """mlx-lm's `QuantizedKVCache.update_and_fetch(keys, values)`: the same MLX ops in its order
    and the same state after, without its `tree_map`s (Python a decode step pays per layer).
    A step that grows the buffers (every `step` positions) or a first one runs mlx-lm's own."""
    num_steps = keys.shape[2]
    prev = cache.offset
    if cache.keys is None or prev + num_steps > cache.keys[0].shape[-2]:
        return cache.update_and_fetch(keys, values)
    cache.offset = end = prev + num_steps
    new_keys = mx.quantize(keys, group_size=cache.group_size, bits=cache.bits)
    new_values = mx.quantize(values, group_size=cache.group_size, bits=cache.bits)
    for i in range(len(cache.keys)):
        cache.keys[i][..., prev:end, :] = new_keys[i]
        cache.values[i][..., prev:end, :] = new_values[i]
    if end == cache.keys[0].shape[2]:
        return cache.keys, cache.values
    return tuple(x[..., :end, :] for x in cache.keys), tuple(x[..., :end, :] for x in cache.values)
