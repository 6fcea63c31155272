"""mla_kv_quant: MLA attention over a quantized latent cache (mlx-lm's `--kv-bits` / `kv_bits`).

Patches the MLA attention class (on glm4_moe_lite: `Glm4MoeLiteAttention`). mlx-lm's
`maybe_quantize_kv_cache` turns each layer's `KVCache` into a `QuantizedKVCache` once its
offset reaches `quantized_kv_start`; mlx-lm's MLA attention then fails on the triples that
cache returns. With this pattern, a step whose cache is a `QuantizedKVCache` runs mlx-lm's
projections and rope, writes the new kv_latent and k_pe through the cache's own
update_and_fetch (quantized there), and reads the cached triples:

- decode (one token): where the `mla_decode_q` kernel runs (GPU) and no mask is given, it reads
  the packed cache directly (dequantized in registers, flash-decoding in float32) and
  `mla_unembed` combines its chunks and projects through unembed_out; elsewhere (CPU) its
  reference `zmlx.latent_quant.latent_attention` (mx.dequantize, then mlx-lm's math) and
  mlx-lm's unembed_out;
- a prompt (several tokens into an already quantized cache: `--quantized-kv-start 0` with a
  prompt longer than one prefill chunk, a chat's later turns, a reused prompt cache): the
  cache's whole latent dequantized, then mlx-lm's prompt branch (keys embed_q(latent), values
  unembed_out(latent)).

With any other cache (or none) the call is mlx-lm's method: bitwise stock. Close with a
quantized cache (judged by the accuracy rule against the bf16 cache). Only 4 and 8 bits
with groups of 32 or 64 are taken (latent_quant.BITS, GROUP_SIZES); others raise ValueError.
DSA models (deepseek_v32, glm_moe_dsa) are skipped: their cache is a CacheList, which mlx-lm
never quantizes. Registered after mla_attention and glm47_rope: where one of those replaced
the attention's method, it wins and this pattern is skipped on that module.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from zmlx.kernels.core import Skip
from zmlx.kernels.mla_attention import mla_unembed
from zmlx.kernels.mla_decode_q import mla_decode_q
from zmlx.kernels.quant import weights_of
from zmlx.latent_quant import dequantize, is_quantized, kv_quant_error, latent_attention
from zmlx.patch.attention import project
from zmlx.patch.pattern import Pattern

SMALLEST_GROUP = 32


def check(attn, params) -> str | None:
    if hasattr(attn, "indexer"):
        return "DSA indexer: the layer's cache is a CacheList, which mlx-lm does not quantize"
    if not all(hasattr(attn, a) for a in ("embed_q", "unembed_out", "kv_a_proj_with_mqa", "kv_a_layernorm")):
        return "not a latent-space (MLA) attention"
    for name in ("kv_lora_rank", "qk_rope_head_dim"):
        if getattr(attn, name) % SMALLEST_GROUP:
            return f"{name} {getattr(attn, name)} is not a multiple of {SMALLEST_GROUP} (the smallest group)"
    return None


def over_quantized(attn, x, mask, cache):
    """What this pattern runs for `attn` over a quantized cache, for another pattern that took
    the attention's __call__ first (glm47_rope, mla_attention: their kernels read a plain
    cache) and meets one; mlx-lm's method where this pattern does not apply to `attn`."""
    if check(attn, None) is None:
        return make()(attn, x, mask, cache)
    return type(attn).__zmlx_original__.__call__(attn, x, mask, cache)


@cache
def make():
    def __call__(self, x, mask=None, cache=None):
        if not is_quantized(cache):
            return type(self).__zmlx_original__.__call__(self, x, mask, cache)
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
        latent, pe = cache.update_and_fetch(kv_latent, k_pe)
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

    return __call__


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


PATTERN = Pattern(
    name="mla_kv_quant",
    summary=(
        "MLA attention over mlx-lm's quantized KV cache (kv_bits 4/8): the latent and k_pe cached"
        " quantized, read through dequantization (otherwise mlx-lm's method)"
    ),
    fidelity="close",
    kernels=(mla_decode_q, mla_unembed),
    check=check,
    make=make,
    paths=("decode", "prefill"),
)
