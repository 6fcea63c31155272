"""mla_attention: MLA's decode attention (rope, absorbed q, latent attention, unembed) in
four launches (close).

Patches the MLA attention class (on glm4_moe_lite: `Glm4MoeLiteAttention`; registered
before `glm47_rope`, which patches the same method, so it wins when both are chosen). A
decode step with mlx-lm's plain `KVCache` and no mask runs: the projections (mlx-lm's),
`glm47_rope` (q_pe * scale and k_pe), the cache update (mlx-lm's own cache object, so
prompts, generate and prompt caches keep working), then `mla_embed_q`, `mla_decode` and
`mla_unembed` over the cache's buffers, then `o_proj`. Prompts, other cache types and
masked steps run mlx-lm's own method. Close, not exact: stock rounds to bf16 at every
step and runs cuBLASLt GEMMs whose order is not ours to follow.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from zmlx.kernels.glm47_rope import glm47_rope
from zmlx.kernels.mla_attention import mla_decode, mla_embed_q, mla_unembed
from zmlx.kernels.quant import weights_of
from zmlx.latent_quant import is_quantized
from zmlx.patch import quantized_attention
from zmlx.patch.attention import mla_reason, project, rope_args
from zmlx.patch.pattern import Pattern


def check(attn, params) -> str | None:
    return mla_reason(attn)  # its rope is glm47_rope's launch (rope_args): YaRN too


@cache
def make():
    def __call__(self, x, mask=None, cache=None):
        if is_quantized(cache):  # mlx-lm's quantized cache (kv_bits): mla_kv_quant reads it
            return quantized_attention.over_quantized(self, x, mask, cache)
        B, L, _ = x.shape
        if L != 1 or mask is not None or type(cache) is not KVCache:
            return type(self).__zmlx_original__.__call__(self, x, mask, cache)
        q, compressed_kv = project(self, x)
        args, kw = rope_args(self, cache.offset)
        q_pe, k_pe = glm47_rope(q, compressed_kv, *args, **kw)  # q_pe is already q_pe * self.scale
        compressed_kv, _ = mx.split(compressed_kv, [self.kv_lora_rank], axis=-1)
        kv_latent = mx.expand_dims(self.kv_a_layernorm(compressed_kv), axis=1)
        lat, kpe = cache.update_and_fetch(kv_latent, k_pe)  # views of the buffers, offset + 1 positions
        embed, embed_packing = weights_of(self.embed_q)
        qv = mla_embed_q(
            q,
            *embed,
            heads=self.num_heads,
            head_dim=self.q_head_dim,
            nope=self.qk_nope_head_dim,
            **embed_packing,
        )
        o, m, lsum = mla_decode(qv, q_pe, lat, kpe, scale=self.scale)
        unembed, unembed_packing = weights_of(self.unembed_out)
        output = mla_unembed(o, m, lsum, *unembed, dtype=x.dtype, **unembed_packing)
        output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(output)

    return __call__


PATTERN = Pattern(
    name="mla_attention",
    summary=(
        "MLA attention at decode: rope, absorbed q (embed_q), attention over the latent cache"
        " (flash-decoding) and unembed_out in four launches"
    ),
    fidelity="close",
    kernels=(glm47_rope, mla_embed_q, mla_decode, mla_unembed),
    check=check,
    make=make,
    paths=("decode",),
)
