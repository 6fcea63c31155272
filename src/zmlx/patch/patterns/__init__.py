"""The registry: every pattern zmlx knows, by name (one small file each). Order matters
where two patterns replace the same method: the earlier one wins (downproj_combine
before moe_combine, mla_attention before glm47_rope before mla_kv_quant), unless both supply a part of it
(Pattern.part: moe_block and mla_block or mla_prologue, the decoder layer's two halves); and a
pattern that yields to another (Pattern.yields_to: residual_norm to moe_block, mla_block and
mla_prologue and gqa_prologue; mla_prologue to mla_block and mla_attention) comes after it."""

from zmlx.patch.patterns import (
    compiled_decode,
    downproj_combine,
    glm47_rope,
    gqa_prologue,
    mla_attention,
    mla_block,
    mla_kv_quant,
    mla_prologue,
    moe_block,
    moe_combine,
    moe_mlp,
    moe_router,
    residual_norm,
    softmax_router,
    swiglu_mlp,
)

PATTERNS = {
    p.name: p
    for p in (
        moe_router.PATTERN,
        softmax_router.PATTERN,
        downproj_combine.PATTERN,
        moe_combine.PATTERN,
        moe_block.PATTERN,
        mla_block.PATTERN,
        moe_mlp.PATTERN,
        swiglu_mlp.PATTERN,
        mla_attention.PATTERN,
        mla_prologue.PATTERN,
        gqa_prologue.PATTERN,
        residual_norm.PATTERN,
        glm47_rope.PATTERN,
        mla_kv_quant.PATTERN,
        compiled_decode.PATTERN,
    )
}
