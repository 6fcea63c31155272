"""glm4_moe_lite (GLM-4.7-Flash) tensors, Hub layout. Its own generator, kept as it was:
the same spec and seed give the same weights, which tests and GPU scripts depend on.

`zmlx_residual_gain` in the config (the `-calm` presets: 0.1; 1.0 when absent) scales the
projections that write into the residual stream (o_proj and every down_proj). At gain 1 a
47-layer model is chaotic: bf16 rounding alone moves its next-token distributions several
nats from its float32 model's, so the accuracy rule cannot tell a close kernel from stock
there. At 0.1 the layers perturb the stream gently and bf16 stays near float32 (capsule of
benchmarks/synth_calm.py), which gives the rule power."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

from zmlx.synth_families.base import key


def _normal(seed, name, shape, std, dtype=mx.bfloat16) -> mx.array:
    return (mx.random.normal(shape, key=key(seed, name)) * std).astype(dtype)


def _linear(seed, name, out_dims, in_dims, gain=1.0) -> mx.array:
    return _normal(seed, name, (out_dims, in_dims), gain / math.sqrt(in_dims))


def _norm(seed, name, dims) -> mx.array:
    # Near 1, not exactly: a fused norm that drops the weight would show.
    return (1.0 + _normal(seed, name, (dims,), 0.1, mx.float32)).astype(mx.bfloat16)


def hub_layer_weights(seed: int, cfg: dict[str, Any], layer: int) -> dict[str, mx.array]:
    """One decoder layer's tensors, named and shaped as in the Hub checkpoint."""
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, vdim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qr, kvr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    p = f"model.layers.{layer}"
    a = f"{p}.self_attn"
    rg = cfg.get("zmlx_residual_gain", 1.0)  # the residual writers' gain (module doc)
    w = {
        f"{p}.input_layernorm.weight": _norm(seed, f"{p}.input_layernorm", D),
        f"{p}.post_attention_layernorm.weight": _norm(seed, f"{p}.post_attention_layernorm", D),
        f"{a}.q_a_proj.weight": _linear(seed, f"{a}.q_a_proj", qr, D),
        f"{a}.q_a_layernorm.weight": _norm(seed, f"{a}.q_a_layernorm", qr),
        f"{a}.q_b_proj.weight": _linear(seed, f"{a}.q_b_proj", H * (nope + rope), qr),
        f"{a}.kv_a_proj_with_mqa.weight": _linear(seed, f"{a}.kv_a_proj_with_mqa", kvr + rope, D),
        f"{a}.kv_a_layernorm.weight": _norm(seed, f"{a}.kv_a_layernorm", kvr),
        f"{a}.kv_b_proj.weight": _linear(seed, f"{a}.kv_b_proj", H * (nope + vdim), kvr),
        f"{a}.o_proj.weight": _linear(seed, f"{a}.o_proj", D, H * vdim, rg),
    }
    m = f"{p}.mlp"
    if layer < cfg["first_k_dense_replace"]:
        inter = cfg["intermediate_size"]
        w[f"{m}.gate_proj.weight"] = _linear(seed, f"{m}.gate_proj", inter, D)
        w[f"{m}.up_proj.weight"] = _linear(seed, f"{m}.up_proj", inter, D)
        w[f"{m}.down_proj.weight"] = _linear(seed, f"{m}.down_proj", D, inter, rg)
        return w
    E, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    # Router logits ~ N(0, 1): sigmoid scores well spread; the correction bias is
    # large enough to change which experts win, as in trained checkpoints.
    w[f"{m}.gate.weight"] = _linear(seed, f"{m}.gate", E, D)
    w[f"{m}.gate.e_score_correction_bias"] = _normal(
        seed, f"{m}.gate.e_score_correction_bias", (E,), 0.05, mx.float32
    )
    for e in range(E):
        x = f"{m}.experts.{e}"
        w[f"{x}.gate_proj.weight"] = _linear(seed, f"{x}.gate_proj", inter, D)
        w[f"{x}.up_proj.weight"] = _linear(seed, f"{x}.up_proj", inter, D)
        w[f"{x}.down_proj.weight"] = _linear(seed, f"{x}.down_proj", D, inter, rg)
    shared = inter * cfg["n_shared_experts"]
    s = f"{m}.shared_experts"
    w[f"{s}.gate_proj.weight"] = _linear(seed, f"{s}.gate_proj", shared, D)
    w[f"{s}.up_proj.weight"] = _linear(seed, f"{s}.up_proj", shared, D)
    w[f"{s}.down_proj.weight"] = _linear(seed, f"{s}.down_proj", D, shared, rg)
    return w


def hub_outer_weights(seed: int, cfg: dict[str, Any]) -> dict[str, mx.array]:
    """Embedding, final norm and LM head (Hub names)."""
    V, D = cfg["vocab_size"], cfg["hidden_size"]
    # A large head gain makes the argmax decisive, so bf16 rounding noise in the
    # stock model does not flip tokens on its own.
    head = _linear(seed, "lm_head", V, D, gain=4.0)
    # The end-of-text row is zero so that greedy decoding rarely stops early.
    head = mx.concatenate([mx.zeros((1, D), head.dtype), head[1:]], axis=0)
    return {
        "model.embed_tokens.weight": _normal(seed, "model.embed_tokens", (V, D), 1.0),
        "model.norm.weight": _norm(seed, "model.norm", D),
        "lm_head.weight": head,
    }
