"""glm47_rope: MLA attention's decode RoPE (q_pe and k_pe) and q_pe's scale in one launch.

Patches the MLA attention class (on glm4_moe_lite: `Glm4MoeLiteAttention`). A decode step
(one token per sequence, one int cache offset) runs mlx-lm's method with the two
`self.rope` calls and the `q_pe * self.scale` multiply replaced by one `glm47_rope` launch
(3 launches -> 1 per layer); everything else is mlx-lm's code, in its order. Prompts and
batched caches with per-sequence offsets take mlx-lm's own method. Exact: the kernel's
cos/sin table is made by `mx.fast.rope` itself. The DeepSeek-V3 family's YaRN rope
(`YarnRoPE`) is fused too: its frequencies go into the table, its mscale multiplies the
input in its dtype as stock does (kernels/glm47_rope.py says why that is exact).

Inside compiled_decode's traced step the offset is a device position (a static cache): the
kernel reads the position only through the table row it takes as input, so the row is
gathered at that position in the graph and the kernel called with it (and offset 0 into
that one-row table). Where the kernel would not run (its reference: on the CPU, after a
failed self-check, or a launch that skips), such steps take mlx-lm's method, whose
`mx.fast.rope` takes the array offset.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention

from zmlx import backend as _backend
from zmlx.kernels.core import Skip
from zmlx.kernels.glm47_rope import glm47_rope
from zmlx.latent_quant import is_quantized
from zmlx.patch import quantized_attention
from zmlx.patch.attention import mla_rope_reason, project, rope_args
from zmlx.patch.pattern import Pattern
from zmlx.static_cache import StaticMLACache


def check(attn, params) -> str | None:
    return mla_rope_reason(attn)


@cache
def make():
    def __call__(self, x, mask=None, cache=None):
        if is_quantized(cache):  # mlx-lm's quantized cache (kv_bits): mla_kv_quant reads it
            return quantized_attention.over_quantized(self, x, mask, cache)
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        if L != 1 or not (isinstance(offset, int) or _static_position(cache)):
            return type(self).__zmlx_original__.__call__(self, x, mask, cache)
        # mlx-lm's Glm4MoeLiteAttention.__call__ at L == 1, the rope and scale fused
        q, compressed_kv = project(self, x)
        if isinstance(offset, int):
            args, kw = rope_args(self, offset)
        else:
            args, kw = _row_args(self, q, compressed_kv, cache)
            if args is None:
                return type(self).__zmlx_original__.__call__(self, x, mask, cache)
        q_pe, k_pe = glm47_rope(q, compressed_kv, *args, **kw)  # q_pe is already q_pe * self.scale
        q = q.reshape(B, L, self.num_heads, self.q_head_dim).transpose(0, 2, 1, 3)
        q_nope, _ = mx.split(q, [self.qk_nope_head_dim], axis=-1)
        compressed_kv, _ = mx.split(compressed_kv, [self.kv_lora_rank], axis=-1)
        kv_latent = self.kv_a_layernorm(compressed_kv)
        kv_latent = mx.expand_dims(kv_latent, axis=1)
        if cache is not None:
            kv_latent, k_pe = cache.update_and_fetch(kv_latent, k_pe)
        pe_scores = q_pe @ k_pe.swapaxes(-1, -2)
        if mask is not None:
            pe_scores = mx.where(mask, pe_scores, mx.array(mx.finfo(pe_scores.dtype).min, pe_scores.dtype))
        q_nope = self.embed_q(q_nope)
        output = scaled_dot_product_attention(
            q_nope, kv_latent, kv_latent, cache=cache, scale=self.scale, mask=pe_scores
        )
        output = self.unembed_out(output)
        output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(output)

    return __call__


def _static_position(cache) -> bool:
    """A static cache inside a compiled step: its offset is one device position."""
    return type(cache) is StaticMLACache and isinstance(cache.offset, mx.array) and cache.offset.size == 1


def _row_args(attn, q, compressed_kv, cache):
    """glm47_rope's arguments at the static cache's device position: the table row gathered
    at it, as a one-row table at offset 0; (None, None) where the kernel would not run it
    (the reference would read offset 0 literally). Runs while compiled_decode traces its
    step, so its Python runs once per trace, not per token."""
    backend = _backend.current()
    if glm47_rope.plan(backend).path != "kernel":
        return None, None
    (table, _), kw = rope_args(attn, cache.capacity - 1)  # the table covers the bucket
    row = mx.take(table, cache.offset.reshape(1), axis=0)
    assert glm47_rope.launch is not None
    if isinstance(glm47_rope.launch(backend, q, compressed_kv, row, 0, **kw), Skip):
        return None, None
    return (row, 0), kw


PATTERN = Pattern(
    name="glm47_rope",
    summary="MLA attention at decode: RoPE of q_pe and k_pe and q_pe's scale in one launch",
    fidelity="exact",
    kernels=(glm47_rope,),
    check=check,
    make=make,
    paths=("decode",),
)
