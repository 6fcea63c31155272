"""GQA-attention MoE families, Hub layout (per-expert tensors that mlx-lm's sanitize stacks):
glm4_moe (GLM-4.5/4.6: sigmoid router with correction bias, shared expert, q/k/v biases,
partial rotary), qwen3_moe (softmax top-k, q/k norms, no shared expert), mixtral (softmax
top-2 of 8, no shared expert)."""

from __future__ import annotations

from typing import Any

from zmlx.synth_families.base import (
    Family,
    T,
    bias,
    common_config,
    gqa_projections,
    layer_norms,
    linear,
    mlp,
    norm,
    outer,
    per_expert,
)


def _attention(a: str, cfg: dict[str, Any], head_dim: int, qkv_bias: bool) -> dict[str, T]:
    proj = gqa_projections(cfg, head_dim)
    w = {f"{a}.{name}.weight": linear(*dims) for name, dims in proj.items()}
    if qkv_bias:
        w.update({f"{a}.{name}.bias": bias(proj[name][0]) for name in ("q_proj", "k_proj", "v_proj")})
    return w


def glm4_moe_tensors(cfg: dict[str, Any], layer: int | None) -> dict[str, T]:
    if layer is None:
        return outer(cfg)
    D, hd = cfg["hidden_size"], cfg["head_dim"]
    p = f"model.layers.{layer}"
    w = {**layer_norms(p, D), **_attention(f"{p}.self_attn", cfg, hd, cfg["attention_bias"])}
    if cfg["use_qk_norm"]:
        w[f"{p}.self_attn.q_norm.weight"] = norm(hd)
        w[f"{p}.self_attn.k_norm.weight"] = norm(hd)
    m = f"{p}.mlp"
    if layer < cfg["first_k_dense_replace"]:
        return {**w, **mlp(m, D, cfg["intermediate_size"])}
    E, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    # As glm4_moe_lite: router logits ~ N(0, 1), a correction bias that changes winners.
    w[f"{m}.gate.weight"] = linear(E, D)
    w[f"{m}.gate.e_score_correction_bias"] = T((E,), 0.05, float32=True)
    w.update(per_expert(f"{m}.experts", E, D, inter))
    w.update(mlp(f"{m}.shared_experts", D, inter * cfg["n_shared_experts"]))
    return w


# GLM-4.5-Air (106B total, 12B active), per its published config.json.
GLM45_AIR: dict[str, Any] = dict(
    vocab_size=151552,
    hidden_size=4096,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=46,
    num_attention_heads=96,
    num_key_value_heads=8,
    head_dim=128,
    n_shared_experts=1,
    n_routed_experts=128,
    num_experts_per_tok=8,
    first_k_dense_replace=1,
)

GLM4_MOE = Family(
    model_type="glm4_moe",
    presets={
        "tiny": dict(
            vocab_size=4096,
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            n_shared_experts=1,
            n_routed_experts=64,
            num_experts_per_tok=8,
            first_k_dense_replace=1,
        ),
        "air": GLM45_AIR,
    },
    common=common_config(
        "glm4_moe",
        "Glm4MoeForCausalLM",
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
        partial_rotary_factor=0.5,
        rope_theta=1_000_000.0,
        rope_scaling=None,
        rms_norm_eps=1e-5,
        attention_bias=True,
        use_qk_norm=False,
        max_position_embeddings=131072,
        num_nextn_predict_layers=1,
    ),
    tensors=glm4_moe_tensors,
    layout="hub",
)


def qwen3_moe_tensors(cfg: dict[str, Any], layer: int | None) -> dict[str, T]:
    if layer is None:
        return outer(cfg)
    D, hd = cfg["hidden_size"], cfg["head_dim"]
    p = f"model.layers.{layer}"
    a = f"{p}.self_attn"
    w = {**layer_norms(p, D), **_attention(a, cfg, hd, qkv_bias=False)}
    w[f"{a}.q_norm.weight"] = norm(hd)
    w[f"{a}.k_norm.weight"] = norm(hd)
    E, inter = cfg["num_experts"], cfg["moe_intermediate_size"]
    # Router logits ~ N(0, 1): the softmax spreads over many experts, no single winner.
    w[f"{p}.mlp.gate.weight"] = linear(E, D)
    w.update(per_expert(f"{p}.mlp.experts", E, D, inter))
    return w


QWEN3_MOE = Family(
    model_type="qwen3_moe",
    presets={
        "tiny": dict(
            vocab_size=4096,
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            num_experts=64,
            num_experts_per_tok=8,
        ),
        # Qwen3-30B-A3B, per its published config.json.
        "30b_a3b": dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
        ),
    },
    common=common_config(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_scaling=None,
        max_position_embeddings=40960,
    ),
    tensors=qwen3_moe_tensors,
    layout="hub",
)


def mixtral_tensors(cfg: dict[str, Any], layer: int | None) -> dict[str, T]:
    if layer is None:
        return outer(cfg)
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    p = f"model.layers.{layer}"
    w = {**layer_norms(p, D), **_attention(f"{p}.self_attn", cfg, D // H, qkv_bias=False)}
    m = f"{p}.block_sparse_moe"
    E, inter = cfg["num_local_experts"], cfg["intermediate_size"]
    w[f"{m}.gate.weight"] = linear(E, D)
    # The Hub's w1/w3/w2 are gate/up/down.
    w.update(per_expert(f"{m}.experts", E, D, inter, names=("w1", "w3", "w2")))
    return w


def _mixtral_sanitize_group(model, group):
    # mlx-lm's Mixtral sanitize converts a checkpoint only when it holds layer 0's experts
    # (it expects the whole checkpoint at once): one layer's group goes through it as layer 0.
    layer = next((k.split(".")[2] for k in group if k.startswith("model.layers.")), None)
    if layer is None:
        return model.sanitize(group)
    a, b = f"model.layers.{layer}.", "model.layers.0."
    out = model.sanitize({k.replace(a, b, 1): v for k, v in group.items()})
    return {k.replace(b, a, 1): v for k, v in out.items()}


MIXTRAL = Family(
    model_type="mixtral",
    presets={
        # mlx-lm's Mixtral derives head_dim = hidden_size / heads: 64 here.
        "tiny": dict(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
        ),
        # Mixtral-8x7B, per its published config.json.
        "8x7b": dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
        ),
    },
    common=common_config(
        "mixtral",
        "MixtralForCausalLM",
        rms_norm_eps=1e-5,
        rope_theta=1_000_000.0,
        max_position_embeddings=32768,
    ),
    tensors=mixtral_tensors,
    layout="hub",
    sanitize_group=_mixtral_sanitize_group,
)
