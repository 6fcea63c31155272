"""What `zmlx.synth` can make: per family, its presets (shapes) and the quantizations."""

from __future__ import annotations

from typing import Any

from zmlx.synth_families import FAMILIES as OTHER_FAMILIES
from zmlx.synth_tokenizer import EOS_ID

# Real GLM-4.7-Flash shapes, and a tiny one with the same structure (dims multiples
# of 64, as MLX's CUDA quantized matmul needs).
GLM4_MOE_LITE_PRESETS: dict[str, dict[str, Any]] = {
    "flash": dict(
        vocab_size=154880,
        hidden_size=2048,
        intermediate_size=10240,
        moe_intermediate_size=1536,
        num_hidden_layers=47,
        num_attention_heads=20,
        num_key_value_heads=20,
        n_shared_experts=1,
        n_routed_experts=64,
        num_experts_per_tok=4,
        kv_lora_rank=512,
        q_lora_rank=768,
        qk_rope_head_dim=64,
        qk_nope_head_dim=192,
        v_head_dim=256,
        first_k_dense_replace=1,
    ),
    "tiny": dict(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=64,
        num_experts_per_tok=4,
        kv_lora_rank=128,
        q_lora_rank=128,
        qk_rope_head_dim=64,
        # 128, not 64: MLX's CUDA quantized matmul has no kernel for the prompt path's
        # untransposed embed_q product with 64 outputs (mlx 0.32.4; benchmarks/NOTEBOOK.md).
        qk_nope_head_dim=128,
        v_head_dim=64,
        first_k_dense_replace=1,
    ),
}
# tiny's shapes at flash's depth: where depth's effect on the model shows, on a CPU
GLM4_MOE_LITE_PRESETS["tiny-deep"] = dict(GLM4_MOE_LITE_PRESETS["tiny"], num_hidden_layers=47)
# The same shapes with the residual writers' gain at 0.1 (synth_families/glm4_moe_lite.py):
# models whose bf16 stays near their float32 model, for the accuracy rule.
GLM4_MOE_LITE_PRESETS.update(
    {
        f"{name}-calm": dict(shape, zmlx_residual_gain=0.1)
        for name, shape in list(GLM4_MOE_LITE_PRESETS.items())
    }
)

GLM4_MOE_LITE_COMMON: dict[str, Any] = dict(
    model_type="glm4_moe_lite",
    architectures=["Glm4MoeLiteForCausalLM"],
    routed_scaling_factor=1.8,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    n_group=1,
    topk_group=1,
    moe_layer_freq=1,
    max_position_embeddings=202752,
    rms_norm_eps=1e-5,
    rope_theta=1_000_000.0,
    rope_scaling=None,
    attention_bias=False,
    partial_rotary_factor=1.0,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,
    torch_dtype="bfloat16",
    eos_token_id=EOS_ID,
)

# quant name -> (mode, group_size, bits); None = bf16 weights in the Hub layout.
QUANTS: dict[str, tuple[str, int, int] | None] = {
    "bf16": None,
    "affine4": ("affine", 64, 4),
    "affine8": ("affine", 64, 8),
    "mxfp4": ("mxfp4", 32, 4),
}

# family (mlx-lm model_type) -> preset name -> the config keys the preset sets.
FAMILIES: dict[str, dict[str, dict[str, Any]]] = {
    "glm4_moe_lite": GLM4_MOE_LITE_PRESETS,
    **{name: family.presets for name, family in OTHER_FAMILIES.items()},
}
