"""MLA attention over mlx-lm's quantized KV cache (kv_bits): what the mla_kv_quant pattern
runs, shared with the attention patterns that take the attention's __call__ before it
(glm47_rope, mla_attention: their kernels read a plain cache) and hand it such a cache.

`attend(attn, x, mask, cache)` is mlx-lm's MLA attention with a `QuantizedKVCache`: mlx-lm's
projections and rope, the cache's update_and_fetch (quantized there; its ops and state through
`zmlx.latent_quant.update_and_fetch`, without mlx-lm's tree_maps), then at decode the
fused `mla_decode_q` + `mla_unembed` where the kernel runs, else
`zmlx.latent_quant.latent_attention`; a prompt dequantizes the cache and runs mlx-lm's prompt
branch. The mla_kv_quant pattern's module doc says more.
"""

from __future__ import annotations

import mlx.core as mx

from zmlx.kernels.core import Skip
from zmlx.kernels.mla_attention import mla_unembed
from zmlx.kernels.mla_decode_q import mla_decode_q
from zmlx.kernels.quant import weights_of
from zmlx.latent_quant import dequantize, kv_quant_error, latent_attention, update_and_fetch
from zmlx.patch.attention import project

SMALLEST_GROUP = 32


def reason(attn) -> str | None:
    """Why `attn` cannot read a quantized latent cache here, or None."""
    if hasattr(attn, "indexer"):
        return "DSA indexer: the layer's cache is a CacheList, which mlx-lm does not quantize"
    if not all(hasattr(attn, a) for a in ("embed_q", "unembed_out", "kv_a_proj_with_mqa", "kv_a_layernorm")):
        return "not a latent-space (MLA) attention"
    for name in ("kv_lora_rank", "qk_rope_head_dim"):
        if getattr(attn, name) % SMALLEST_GROUP:
            return f"{name} {getattr(attn, name)} is not a multiple of {SMALLEST_GROUP} (the smallest group)"
    return None


def over_quantized(attn, x, mask, cache):
    """`attend` where `attn` can read the quantized cache, else mlx-lm's method (which fails
    on it, as stock does)."""
    if reason(attn) is None:
        return attend(attn, x, mask, cache)
    return type(attn).__zmlx_original__.__call__(attn, x, mask, cache)


def attend(self, x, mask, cache):
    """mlx-lm's MLA attention of `self` over the quantized cache `cache` (see the module doc)."""
    if (why := kv_quant_error(cache.bits, cache.group_size)) is not None:
        raise ValueError(why)
    # mlx-lm's MLA attention up to the cache update, in its order
    B, L, _ = x.shape
    q, compressed_kv = project(self, x)
    q = q.reshape(B, L, self.num_heads, self.q_head_dim).transpose(0, 2, 1, 3)
    q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)
    compressed_kv, k_pe = mx.split(compressed_kv, [self.kv_lora_rank], axis=-1)
    k_pe = k_pe.reshape(B, L, 1, self.qk_rope_head_dim).transpose(0, 2, 1, 3)
    kv_latent = self.kv_a_layernorm(compressed_kv)
    q_pe = self.rope(q_pe, cache.offset)
    k_pe = self.rope(k_pe, cache.offset)
    kv_latent = mx.expand_dims(kv_latent, axis=1)
    latent, pe = update_and_fetch(cache, kv_latent, k_pe)  # mlx-lm's, less its Python
    quant = dict(group_size=cache.group_size, bits=cache.bits)
    if L == 1:
        q_nope = self.embed_q(q_nope)
        output = _fused_decode(self, q_nope, q_pe, latent, pe, mask, quant, x.dtype)
        if output is None:
            output = latent_attention(q_nope, q_pe, latent, pe, scale=self.scale, mask=mask, **quant)
            output = self.unembed_out(output)
    else:
        output = _prompt(self, q_nope, q_pe, dequantize(latent, **quant), dequantize(pe, **quant), mask)
    output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
    return self.o_proj(output)


def _fused_decode(attn, q_nope, q_pe, latent, pe, mask, quant, dtype):
    """The decode attention through unembed_out in two launches (mla_decode_q's partials over
    the packed cache, mla_unembed's combine and projection), or None where the kernel does
    not run (the CPU: its plan is the reference; shapes its launch skips: latent_attention,
    not the kernel's float32 reference, then runs), a mask is given or unembed_out is not affine."""
    plan = mla_decode_q.plan()
    if mask is not None or plan.path != "kernel":
        return None
    unembed, packing = weights_of(attn.unembed_out)
    if "mode" in packing:  # mla_unembed reads affine or unquantized rows only
        return None
    out = mla_decode_q.run_kernel(plan.backend, q_nope, q_pe, *latent, *pe, scale=attn.scale, **quant)
    if isinstance(out, Skip):
        return None
    o, m, lsum = out
    return mla_unembed(o, m, lsum, *unembed, dtype=dtype, **packing)


def _prompt(attn, q_nope, q_pe, kv_latent, k_pe, mask):
    """mlx-lm's prompt branch over the dequantized cache."""
    pe_scores = (q_pe * attn.scale) @ k_pe.swapaxes(-1, -2)
    if mask is not None:
        pe_scores = mx.where(mask, pe_scores, mx.array(mx.finfo(pe_scores.dtype).min, pe_scores.dtype))
    k = attn.embed_q(kv_latent, transpose=False)
    v = attn.unembed_out(kv_latent)
    return mx.fast.scaled_dot_product_attention(q_nope, k, v, scale=attn.scale, mask=pe_scores)
