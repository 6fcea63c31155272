"""The families `zmlx.synth` makes beyond glm4_moe_lite, by mlx-lm model_type."""

from __future__ import annotations

from zmlx.synth_families.base import Family
from zmlx.synth_families.gpt_oss import GPT_OSS
from zmlx.synth_families.gqa import GLM4_MOE, MIXTRAL, QWEN3_MOE
from zmlx.synth_families.mla import DEEPSEEK_V3, DEEPSEEK_V32, GLM_MOE_DSA, KIMI_K25

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (DEEPSEEK_V3, KIMI_K25, DEEPSEEK_V32, GLM_MOE_DSA, GLM4_MOE, QWEN3_MOE, GPT_OSS, MIXTRAL)
}
