"""gpt-oss: attention sinks, alternating sliding-window and full attention, q/k/v/o biases;
a softmax-over-top-k router with a bias; experts with biases and the clamped SwiGLU.

mlx-lm's own layout (stacked `experts.gate_proj/up_proj/down_proj` with biases): mlx-lm's
sanitize converts only the Hub's mxfp4 `*_blocks`/`*_scales` tensors and leaves this
layout as it is; the Hub's bf16 `gate_up_proj` it does not convert to loadable names.
"""

from __future__ import annotations

from typing import Any

from zmlx.synth_families.base import (
    Family,
    T,
    bias,
    common_config,
    experts,
    gqa_projections,
    layer_norms,
    linear,
    outer,
)


def gpt_oss_tensors(cfg: dict[str, Any], layer: int | None) -> dict[str, T]:
    if layer is None:
        return outer(cfg)
    D, H, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    E, inter = cfg["num_local_experts"], cfg["intermediate_size"]
    p = f"model.layers.{layer}"
    a, m = f"{p}.self_attn", f"{p}.mlp"
    w = layer_norms(p, D)
    for name, (out_dims, in_dims) in gqa_projections(cfg, hd).items():
        w[f"{a}.{name}.weight"] = linear(out_dims, in_dims)
        w[f"{a}.{name}.bias"] = bias(out_dims)
    # Sink logits of the order of the attention scores: they take a real share.
    w[f"{a}.sinks"] = T((H,), 1.0)
    w[f"{m}.router.weight"] = linear(E, D)
    w[f"{m}.router.bias"] = bias(E)
    for name, out_dims, in_dims in (("gate_proj", inter, D), ("up_proj", inter, D), ("down_proj", D, inter)):
        w[f"{m}.experts.{name}.weight"] = experts(E, out_dims, in_dims)
        w[f"{m}.experts.{name}.bias"] = bias(E, out_dims)
    return w


def _alternating(layers: int) -> list[str]:
    return ["sliding_attention", "full_attention"] * (layers // 2)


GPT_OSS = Family(
    model_type="gpt_oss",
    presets={
        # A window shorter than a test's decode, so the rotating cache wraps.
        "tiny": dict(
            vocab_size=4096,
            hidden_size=128,
            intermediate_size=128,
            num_hidden_layers=4,
            layer_types=_alternating(4),
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            num_local_experts=16,
            num_experts_per_tok=4,
            sliding_window=16,
        ),
        # gpt-oss-20b, per its published config.json.
        "20b": dict(
            vocab_size=201088,
            hidden_size=2880,
            intermediate_size=2880,
            num_hidden_layers=24,
            layer_types=_alternating(24),
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            num_local_experts=32,
            num_experts_per_tok=4,
            sliding_window=128,
        ),
    },
    common=common_config(
        "gpt_oss",
        "GptOssForCausalLM",
        rms_norm_eps=1e-5,
        rope_theta=150000,
        rope_scaling=dict(
            rope_type="yarn",
            factor=32.0,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
            original_max_position_embeddings=4096,
        ),
        max_position_embeddings=131072,
        swiglu_limit=7.0,
    ),
    tensors=gpt_oss_tensors,
    layout="mlx",
)
