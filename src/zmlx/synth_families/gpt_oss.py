"""gpt-oss: attention sinks, alternating sliding-window and full attention, q/k/v/o biases;
a softmax-over-top-k router with a bias; experts with biases and the clamped SwiGLU.

mlx-lm's own layout (stacked `experts.gate_proj/up_proj/down_proj` with biases): mlx-lm's
sanitize converts only the Hub's mxfp4 `*_blocks`/`*_scales` tensors and leaves this
layout as it is; the Hub's bf16 `gate_up_proj` it does not convert to loadable names.
"""

from __future__ import annotations

from typing import Any

from zmlx.synth_families.base import Family, T, bias, experts, linear, norm, outer
from zmlx.synth_tokenizer import EOS_ID


def gpt_oss_tensors(cfg: dict[str, Any], layer: int | None) -> dict[str, T]:
    if layer is None:
        return outer(cfg)
    D, H, KV, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    E, inter = cfg["num_local_experts"], cfg["intermediate_size"]
    p = f"model.layers.{layer}"
    a, m = f"{p}.self_attn", f"{p}.mlp"
    return {
        f"{p}.input_layernorm.weight": norm(D),
        f"{p}.post_attention_layernorm.weight": norm(D),
        f"{a}.q_proj.weight": linear(H * hd, D),
        f"{a}.q_proj.bias": bias(H * hd),
        f"{a}.k_proj.weight": linear(KV * hd, D),
        f"{a}.k_proj.bias": bias(KV * hd),
        f"{a}.v_proj.weight": linear(KV * hd, D),
        f"{a}.v_proj.bias": bias(KV * hd),
        f"{a}.o_proj.weight": linear(D, H * hd),
        f"{a}.o_proj.bias": bias(D),
        # Sink logits of the order of the attention scores: they take a real share.
        f"{a}.sinks": T((H,), 1.0),
        f"{m}.router.weight": linear(E, D),
        f"{m}.router.bias": bias(E),
        f"{m}.experts.gate_proj.weight": experts(E, inter, D),
        f"{m}.experts.gate_proj.bias": bias(E, inter),
        f"{m}.experts.up_proj.weight": experts(E, inter, D),
        f"{m}.experts.up_proj.bias": bias(E, inter),
        f"{m}.experts.down_proj.weight": experts(E, D, inter),
        f"{m}.experts.down_proj.bias": bias(E, D),
    }


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
    common=dict(
        model_type="gpt_oss",
        architectures=["GptOssForCausalLM"],
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
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        eos_token_id=EOS_ID,
    ),
    tensors=gpt_oss_tensors,
    layout="mlx",
)
