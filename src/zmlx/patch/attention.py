"""What the MLA attention patterns (glm47_rope, mla_attention, mla_block) share: which attention
modules they apply to, mlx-lm's projections of a decode step, and the arguments of the
`glm47_rope` launch that ropes q_pe and k_pe. Each pattern calls the kernel itself."""

from __future__ import annotations

import mlx.nn as nn
from mlx_lm.models.rope_utils import YarnRoPE

from zmlx.kernels.glm47_rope import rope_table


def mla_rope_reason(attn) -> str | None:
    """None when `attn` is a latent-space (MLA) attention whose rope glm47_rope's arithmetic
    fuses (every caller ropes through it: glm47_rope, mla_attention through `rope_args`,
    mla_block's mla_q_prep), else why not: plain nn.RoPE, and YaRN (mlx-lm's YarnRoPE,
    rope_scaling "yarn": DeepSeek-V3, Kimi-K2) exactly."""
    if hasattr(attn, "indexer"):  # DeepSeek-V3.2, GLM-5: the kernels attend to every position
        return "DSA indexer (sparse attention over the cache's top-k positions) is not supported"
    rope = getattr(attn, "rope", None)
    if rope is None or type(rope) not in (nn.RoPE, YarnRoPE):
        return f"rope is {type(rope).__name__}, not nn.RoPE or YarnRoPE (this rope_scaling is not fused)"
    if not rope.traditional:
        return "rope is not traditional (interleaved pairs)"
    if type(rope) is nn.RoPE and rope.base is None:
        return "rope has no base (custom frequencies)"
    if rope.dims != attn.qk_rope_head_dim:
        return f"rope dims {rope.dims} != qk_rope_head_dim {attn.qk_rope_head_dim}"
    if not all(hasattr(attn, a) for a in ("embed_q", "unembed_out", "kv_a_proj_with_mqa", "kv_a_layernorm")):
        return "not a latent-space (MLA) attention"
    return None


def mla_reason(attn) -> str | None:
    """mla_rope_reason, and why the absorbed projections (embed_q, unembed_out) cannot go
    through mla_attention's kernels (they read affine or unquantized weights), or None."""
    if (why := mla_rope_reason(attn)) is not None:
        return why
    for name in ("embed_q", "unembed_out"):
        proj = getattr(attn, name)
        if getattr(proj, "mode", "affine") != "affine":
            return f"{name} is {proj.mode}-quantized (affine or unquantized needed)"
        if proj.get("scales") is not None and proj.get("biases") is None:
            return f"{name} has no biases"
    return None


def project(attn, x):
    """mlx-lm's q and compressed kv projections of x: (q, compressed_kv)."""
    if attn.q_lora_rank is None:
        q = attn.q_proj(x)
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    return q, attn.kv_a_proj_with_mqa(x)


def rope_args(attn, offset: int) -> tuple[tuple, dict]:
    """(positional, keyword) arguments after (q, compressed_kv) of the glm47_rope launch
    that ropes the token at `offset` and scales q_pe by attn.scale."""
    rope = attn.rope
    if type(rope) is YarnRoPE:
        # mlx-lm's MLA attention calls it with its default scale 1.0; the table is made with its
        # frequencies, the kernel scales the input by its mscale (glm47_rope's rules)
        freqs = rope._freqs
        table = rope_table(rope.dims, None, 1.0, offset + 1, freqs=freqs)
        kw = dict(base=None, rope_scale=1.0, freqs=freqs, mscale=rope.mscale)
    else:
        table = rope_table(rope.dims, rope.base, rope.scale, offset + 1)
        kw = dict(base=rope.base, rope_scale=rope.scale)
    return (table, offset), dict(heads=attn.num_heads, rope_dims=rope.dims, scale=attn.scale, **kw)
