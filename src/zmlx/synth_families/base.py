"""What a synthetic family is: its presets, its config.json, and its tensors, each named,
shaped and scaled (materialized by `zmlx.synth`, seeded per tensor name)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import mlx.core as mx

from zmlx.synth_tokenizer import EOS_ID


class T(NamedTuple):
    """One tensor to make: N(mean, std) of `shape` (drawn in float32), stored bf16 unless `float32`."""

    shape: tuple[int, ...]
    std: float
    mean: float = 0.0
    float32: bool = False
    zero_first_row: bool = False  # the end-of-text row of a head


def linear(out_dims: int, in_dims: int, gain: float = 1.0) -> T:
    # Unit-variance inputs give unit-variance outputs: activations neither die nor blow up.
    return T((out_dims, in_dims), gain / math.sqrt(in_dims))


def experts(n: int, out_dims: int, in_dims: int) -> T:
    """Stacked expert weights (mlx-lm's switch_mlp layout), each scaled as a linear."""
    return T((n, out_dims, in_dims), 1.0 / math.sqrt(in_dims))


def norm(dims: int) -> T:
    # Near 1, not exactly: a fused norm that drops the weight would show.
    return T((dims,), 0.1, mean=1.0)


def bias(*shape: int, std: float = 0.1) -> T:
    return T(tuple(shape), std)


def outer(cfg: dict[str, Any], prefix: str = "") -> dict[str, T]:
    """Embedding, final norm and LM head (mlx-lm and Hub names agree on these)."""
    V, D = cfg["vocab_size"], cfg["hidden_size"]
    return {
        f"{prefix}model.embed_tokens.weight": T((V, D), 1.0),
        f"{prefix}model.norm.weight": norm(D),
        # A large head gain makes the argmax decisive, so bf16 rounding noise in the stock
        # model does not flip tokens on its own; the end-of-text row is zero so that greedy
        # decoding rarely stops early.
        f"{prefix}lm_head.weight": T((V, D), 4.0 / math.sqrt(D), zero_first_row=True),
    }


def mlp(prefix: str, D: int, inter: int) -> dict[str, T]:
    """A gated MLP (gate/up/down), Hub names."""
    return {
        f"{prefix}.gate_proj.weight": linear(inter, D),
        f"{prefix}.up_proj.weight": linear(inter, D),
        f"{prefix}.down_proj.weight": linear(D, inter),
    }


def per_expert(prefix: str, n: int, D: int, inter: int, names=("gate_proj", "up_proj", "down_proj")):
    """Per-expert Hub tensors `{prefix}.{e}.{name}.weight` (sanitize stacks them)."""
    gate, up, down = names
    out: dict[str, T] = {}
    for e in range(n):
        out[f"{prefix}.{e}.{gate}.weight"] = linear(inter, D)
        out[f"{prefix}.{e}.{up}.weight"] = linear(inter, D)
        out[f"{prefix}.{e}.{down}.weight"] = linear(D, inter)
    return out


def layer_norms(prefix: str, D: int) -> dict[str, T]:
    """A decoder layer's two RMSNorms, input and post-attention (Hub and mlx-lm names agree)."""
    return {f"{prefix}.input_layernorm.weight": norm(D), f"{prefix}.post_attention_layernorm.weight": norm(D)}


def gqa_projections(cfg: dict[str, Any], head_dim: int) -> dict[str, tuple[int, int]]:
    """GQA attention's projections, name -> (out, in): q and o over every head, k and v over
    the key-value heads."""
    D, H, KV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return {
        "q_proj": (H * head_dim, D),
        "k_proj": (KV * head_dim, D),
        "v_proj": (KV * head_dim, D),
        "o_proj": (D, H * head_dim),
    }


def common_config(model_type: str, architecture: str, **keys: Any) -> dict[str, Any]:
    """A family's config keys shared by its presets: its type and class, `keys`, and what every
    synthetic checkpoint says (untied bf16 weights, the synthetic tokenizer's end of text)."""
    return dict(
        model_type=model_type,
        architectures=[architecture],
        **keys,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        eos_token_id=EOS_ID,
    )


@dataclass(frozen=True)
class Family:
    """One mlx-lm model_type that `zmlx.synth` can make.

    `presets` maps a preset name to the config keys it sets over `common`; `tensors(cfg,
    layer)` names every tensor of one decoder layer (`layer` None: embedding, norm, head)
    in the layout the checkpoint stores; `layout` says which layout that is. A preset in
    `faithful` is layer-faithful: real per-layer shapes, fewer layers than the real model;
    its value is the label every report carries.
    """

    model_type: str
    presets: dict[str, dict[str, Any]]
    common: dict[str, Any]
    tensors: Callable[[dict[str, Any], int | None], dict[str, T]]
    layout: str  # "hub" (mlx-lm's sanitize converts it) or "mlx" (sanitize has nothing to do)
    faithful: dict[str, str] = field(default_factory=dict)
    nest: str | None = None  # config key holding the text model's config (kimi_k25: text_config)
    # mlx-lm's sanitize applied to one layer's tensors (default: model.sanitize itself).
    sanitize_group: Callable[[Any, dict[str, mx.array]], dict[str, mx.array]] | None = None

    def config(self, preset: str) -> dict[str, Any]:
        """config.json of the bf16 checkpoint."""
        text = {**self.common, **self.presets[preset]}
        if self.nest is None:
            return text
        # A multimodal wrapper: the text model's config nested, the ids at the top.
        return {
            "model_type": self.model_type,
            "architectures": text.pop("wrapper_architectures"),
            self.nest: text,
            "eos_token_id": text["eos_token_id"],
            "tie_word_embeddings": False,
        }


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: `cfg` itself, or its nested text_config."""
    return cfg.get("text_config", cfg)


def key(seed: int, name: str) -> mx.array:
    # Seed per tensor name: reproducible whatever order tensors are made in.
    return mx.random.key((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 32))


def make(seed: int, name: str, t: T) -> mx.array:
    """The tensor `t` describes, drawn from `name`'s seed."""
    x = mx.random.normal(t.shape, key=key(seed, name)) * t.std
    if t.mean:
        x = t.mean + x
    x = x.astype(mx.float32 if t.float32 else mx.bfloat16)
    if t.zero_first_row:
        x = mx.concatenate([mx.zeros((1, *t.shape[1:]), x.dtype), x[1:]], axis=0)
    return x
