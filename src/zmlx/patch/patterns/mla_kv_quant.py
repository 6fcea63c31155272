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

from zmlx.kernels.mla_attention import mla_unembed
from zmlx.kernels.mla_decode_q import mla_decode_q
from zmlx.latent_quant import is_quantized
from zmlx.patch import quantized_attention
from zmlx.patch.pattern import Pattern


def check(attn, params) -> str | None:
    return quantized_attention.reason(attn)


@cache
def make():
    def __call__(self, x, mask=None, cache=None):
        if not is_quantized(cache):
            return type(self).__zmlx_original__.__call__(self, x, mask, cache)
        return quantized_attention.attend(self, x, mask, cache)

    return __call__


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
