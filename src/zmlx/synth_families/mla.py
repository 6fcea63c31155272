"""The DeepSeek-V3 family (MLA attention, shared-expert MoE with a sigmoid router):
deepseek_v3, kimi_k25 (DeepSeek-V3 classes under a multimodal wrapper), and the DSA
variants deepseek_v32 and glm_moe_dsa (a lightning indexer per attention layer).

Hub layout: per-expert tensors that mlx-lm's sanitize stacks, `kv_b_proj` that it splits
into embed_q/unembed_out, the indexer under `self_attn.indexer` (same names in mlx-lm).
"""

from __future__ import annotations

from typing import Any

from zmlx.synth_families.base import Family, T, bias, linear, mlp, norm, outer, per_expert
from zmlx.synth_tokenizer import EOS_ID


def layer_tensors(cfg: dict[str, Any], layer: int | None, prefix: str = "") -> dict[str, T]:
    if layer is None:
        return outer(cfg, prefix)
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, vdim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qr, kvr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    p = f"{prefix}model.layers.{layer}"
    a = f"{p}.self_attn"
    w = {
        f"{p}.input_layernorm.weight": norm(D),
        f"{p}.post_attention_layernorm.weight": norm(D),
        f"{a}.q_a_proj.weight": linear(qr, D),
        f"{a}.q_a_layernorm.weight": norm(qr),
        f"{a}.q_b_proj.weight": linear(H * (nope + rope), qr),
        f"{a}.kv_a_proj_with_mqa.weight": linear(kvr + rope, D),
        f"{a}.kv_a_layernorm.weight": norm(kvr),
        f"{a}.kv_b_proj.weight": linear(H * (nope + vdim), kvr),
        f"{a}.o_proj.weight": linear(D, H * vdim),
    }
    if "index_topk" in cfg:  # DSA: the indexer scores every cached position, keeps index_topk
        ih, idim = cfg["index_n_heads"], cfg["index_head_dim"]
        i = f"{a}.indexer"
        w[f"{i}.wq_b.weight"] = linear(ih * idim, qr)
        w[f"{i}.wk.weight"] = linear(idim, D)
        w[f"{i}.k_norm.weight"] = norm(idim)
        w[f"{i}.k_norm.bias"] = bias(idim)
        w[f"{i}.weights_proj.weight"] = linear(ih, D)
    m = f"{p}.mlp"
    if layer < cfg["first_k_dense_replace"]:
        return {**w, **mlp(m, D, cfg["intermediate_size"])}
    E, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    # Router logits ~ N(0, 1): sigmoid scores well spread; the correction bias is large
    # enough to change which experts win, as in trained checkpoints.
    w[f"{m}.gate.weight"] = linear(E, D)
    w[f"{m}.gate.e_score_correction_bias"] = T((E,), 0.05, float32=True)
    w.update(per_expert(f"{m}.experts", E, D, inter))
    w.update(mlp(f"{m}.shared_experts", D, inter * cfg["n_shared_experts"]))
    return w


def faithful(real: dict[str, Any], layers: int) -> dict[str, Any]:
    """The real model's per-layer shapes with `layers` layers: one dense layer first, so a
    short stack is mostly MoE layers, like the real one."""
    return {**real, "num_hidden_layers": layers, "first_k_dense_replace": 1}


# Tiny MLA shapes shared by the tiny presets (as glm4_moe_lite's tiny): dims multiples of
# 64, as MLX's CUDA quantized matmul needs; qk_nope_head_dim 128 because it has no kernel
# for the prompt path's untransposed embed_q product with 64 outputs.
TINY_MLA: dict[str, Any] = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    kv_lora_rank=128,
    q_lora_rank=128,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=64,
    first_k_dense_replace=1,
)

# DeepSeek-V3 / R1 (671B), per its published config.json.
DEEPSEEK_V3_REAL: dict[str, Any] = dict(
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    num_key_value_heads=128,
    n_shared_experts=1,
    n_routed_experts=256,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=1536,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    first_k_dense_replace=3,
)

DEEPSEEK_COMMON: dict[str, Any] = dict(
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    moe_layer_freq=1,
    max_position_embeddings=163840,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling=dict(
        type="yarn",
        factor=40.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        original_max_position_embeddings=4096,
        beta_fast=32,
        beta_slow=1,
    ),
    attention_bias=False,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,
    torch_dtype="bfloat16",
    eos_token_id=EOS_ID,
)

# Group-limited routing kept: 8 groups of 8 experts, the best 4 groups, top 8.
DEEPSEEK_V3_TINY = {
    **TINY_MLA,
    "n_routed_experts": 64,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
}

DEEPSEEK_V3 = Family(
    model_type="deepseek_v3",
    presets={
        "tiny": DEEPSEEK_V3_TINY,
        "layers4": faithful(DEEPSEEK_V3_REAL, 4),
        "layers12": faithful(DEEPSEEK_V3_REAL, 12),
    },
    common={"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], **DEEPSEEK_COMMON},
    tensors=layer_tensors,
    layout="hub",
    faithful={
        "layers4": "layer-faithful: DeepSeek-V3 (671B) per-layer shapes, 4 of 61 layers",
        "layers12": "layer-faithful: DeepSeek-V3 (671B) per-layer shapes, 12 of 61 layers",
    },
)

# DeepSeek-V3.2 (671B): DeepSeek-V3's shapes plus the DSA indexer, per its config.json.
DSA_V32 = dict(index_n_heads=64, index_head_dim=128, index_topk=2048)
# The tiny indexer keeps fewer positions than a test decodes, so the sparse path runs.
DSA_TINY = dict(index_n_heads=4, index_head_dim=128, index_topk=16)

DEEPSEEK_V32 = Family(
    model_type="deepseek_v32",
    presets={
        "tiny": {**DEEPSEEK_V3_TINY, **DSA_TINY},
        "layers4": {**faithful(DEEPSEEK_V3_REAL, 4), **DSA_V32},
        "layers12": {**faithful(DEEPSEEK_V3_REAL, 12), **DSA_V32},
    },
    common={"model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"], **DEEPSEEK_COMMON},
    tensors=layer_tensors,
    layout="hub",
    faithful={
        "layers4": "layer-faithful: DeepSeek-V3.2 (671B) per-layer shapes, 4 of 61 layers",
        "layers12": "layer-faithful: DeepSeek-V3.2 (671B) per-layer shapes, 12 of 61 layers",
    },
)


def _kimi_tensors(cfg: dict[str, Any], layer: int | None) -> dict[str, T]:
    return layer_tensors(cfg["text_config"], layer, prefix="language_model.")


# Kimi-K2 / K2.5 text model (1T): 384 experts, no group limit, 64 heads, per its config.json.
KIMI_K2_REAL: dict[str, Any] = {
    **DEEPSEEK_V3_REAL,
    "vocab_size": 163840,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "n_routed_experts": 384,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.827,
    "first_k_dense_replace": 1,
}

KIMI_K25 = Family(
    model_type="kimi_k25",
    presets={
        "tiny": {**TINY_MLA, "n_routed_experts": 64, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1},
        "layers4": faithful(KIMI_K2_REAL, 4),
        "layers8": faithful(KIMI_K2_REAL, 8),
    },
    common={
        **DEEPSEEK_COMMON,
        "model_type": "kimi_k2",
        "wrapper_architectures": ["KimiK25ForConditionalGeneration"],
        "routed_scaling_factor": 2.827,
        "rope_theta": 50000.0,
        "max_position_embeddings": 131072,
        "rope_scaling": {**DEEPSEEK_COMMON["rope_scaling"], "factor": 32.0, "beta_fast": 1},
    },
    tensors=_kimi_tensors,
    layout="hub",
    faithful={
        "layers4": "layer-faithful: Kimi-K2.5 (1T) per-layer shapes, 4 of 61 layers",
        "layers8": "layer-faithful: Kimi-K2.5 (1T) per-layer shapes, 8 of 61 layers",
    },
    nest="text_config",
)


# GLM-5 (744B): MLA with GLM's head dims, DSA indexer, per its config.json.
GLM5_REAL: dict[str, Any] = dict(
    vocab_size=154880,
    hidden_size=6144,
    intermediate_size=12288,
    moe_intermediate_size=2048,
    num_hidden_layers=78,
    num_attention_heads=64,
    num_key_value_heads=64,
    n_shared_experts=1,
    n_routed_experts=256,
    num_experts_per_tok=8,
    kv_lora_rank=512,
    q_lora_rank=2048,
    qk_rope_head_dim=64,
    qk_nope_head_dim=192,
    v_head_dim=256,
    first_k_dense_replace=3,
    index_n_heads=32,
    index_head_dim=128,
    index_topk=2048,
)

GLM_MOE_DSA = Family(
    model_type="glm_moe_dsa",
    presets={
        "tiny": {**TINY_MLA, **DSA_TINY, "n_routed_experts": 64, "num_experts_per_tok": 8},
        "layers4": faithful(GLM5_REAL, 4),
        "layers12": faithful(GLM5_REAL, 12),
    },
    common=dict(
        model_type="glm_moe_dsa",
        architectures=["GlmMoeDsaForCausalLM"],
        routed_scaling_factor=2.5,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
        moe_layer_freq=1,
        max_position_embeddings=202752,
        rms_norm_eps=1e-5,
        rope_parameters=dict(rope_theta=1_000_000.0, rope_type="default"),
        attention_bias=False,
        tie_word_embeddings=False,
        num_nextn_predict_layers=1,
        torch_dtype="bfloat16",
        eos_token_id=EOS_ID,
    ),
    tensors=layer_tensors,
    layout="hub",
    faithful={
        "layers4": "layer-faithful: GLM-5 (744B) per-layer shapes, 4 of 78 layers",
        "layers12": "layer-faithful: GLM-5 (744B) per-layer shapes, 12 of 78 layers",
    },
)
