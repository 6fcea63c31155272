"""Synthetic checkpoints that `mlx_lm.load` reads unchanged (no network needed).

A checkpoint is written the way it reaches users: bf16 in the Hub layout (per-expert
tensors that mlx-lm's `sanitize` stacks, `kv_b_proj` that it splits), or quantized in
the layout mlx-lm's converter writes (sanitized, `quantization` in config.json).
The same generator also builds the model in memory (`build`), for benchmarks that
should not spend minutes writing ~17 GB of safetensors; a model spec names it:

    synth:glm4_moe_lite/flash/affine4[@seed]

Weights are random, seeded per tensor name (reproducible, order-independent) and
scaled so that greedy decoding is not degenerate.

    python -m zmlx.synth glm4_moe_lite --preset tiny --quant bf16 --out ./glm47-tiny
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn

from zmlx import safe_write
from zmlx.synth_presets import FAMILIES, GLM4_MOE_LITE_COMMON, QUANTS
from zmlx.synth_tokenizer import EOS_ID as EOS_ID  # re-exported: synth.EOS_ID
from zmlx.synth_tokenizer import load_tokenizer_for, write_tokenizer

SPEC_PREFIX = "synth:"
# Marks a directory this module wrote: only such a directory (or an empty one) is replaced.
MANIFEST = "zmlx-synth.json"


class SynthError(ValueError):
    """A synthetic model that cannot be made as asked; the message says why."""


@dataclass(frozen=True)
class SynthSpec:
    family: str = "glm4_moe_lite"
    preset: str = "tiny"
    quant: str = "bf16"
    seed: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise SynthError(f"unknown family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.preset not in FAMILIES[self.family]:
            known = ", ".join(FAMILIES[self.family])
            raise SynthError(f"unknown preset {self.preset!r} for {self.family}; known: {known}")
        if self.quant not in QUANTS:
            raise SynthError(f"unknown quantization {self.quant!r}; known: {', '.join(QUANTS)}")

    @property
    def name(self) -> str:
        seed = f"@{self.seed}" if self.seed else ""
        return f"{SPEC_PREFIX}{self.family}/{self.preset}/{self.quant}{seed}"

    @property
    def quantization(self) -> str:
        """The label zmlx records: 'bf16' or e.g. 'affine4/g64' (as for loaded checkpoints)."""
        quant = QUANTS[self.quant]
        return "bf16" if quant is None else f"{quant[0]}{quant[2]}/g{quant[1]}"

    @classmethod
    def parse(cls, text: str) -> "SynthSpec":
        """'synth:glm4_moe_lite/flash/affine4@1' -> SynthSpec."""
        if not text.startswith(SPEC_PREFIX):
            raise SynthError(f"not a synthetic model spec: {text!r}")
        body, _, seed = text[len(SPEC_PREFIX) :].partition("@")
        parts = body.split("/")
        if len(parts) != 3 or not all(parts):
            raise SynthError(f"bad spec {text!r}: use synth:FAMILY/PRESET/QUANT[@SEED]")
        if seed and not seed.isdigit():
            raise SynthError(f"bad seed in {text!r}: use a non-negative integer")
        family, preset, quant = parts
        return cls(family, preset, quant, seed=int(seed or 0))


def is_spec(text: str) -> bool:
    return str(text).startswith(SPEC_PREFIX)


def model_config(spec: SynthSpec) -> dict[str, Any]:
    """config.json of the bf16 (Hub-layout) checkpoint."""
    return {**GLM4_MOE_LITE_COMMON, **FAMILIES[spec.family][spec.preset]}


# ---------------------------------------------------------------- weights


def _key(spec: SynthSpec, name: str) -> mx.array:
    # Seed per tensor name: reproducible whatever order tensors are made in.
    return mx.random.key((spec.seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 32))


def _normal(spec, name, shape, std, dtype=mx.bfloat16) -> mx.array:
    return (mx.random.normal(shape, key=_key(spec, name)) * std).astype(dtype)


def _linear(spec, name, out_dims, in_dims, gain=1.0) -> mx.array:
    return _normal(spec, name, (out_dims, in_dims), gain / math.sqrt(in_dims))


def _norm(spec, name, dims) -> mx.array:
    # Near 1, not exactly: a fused norm that drops the weight would show.
    return (1.0 + _normal(spec, name, (dims,), 0.1, mx.float32)).astype(mx.bfloat16)


def hub_layer_weights(spec: SynthSpec, cfg: dict[str, Any], layer: int) -> dict[str, mx.array]:
    """One decoder layer's tensors, named and shaped as in the Hub checkpoint."""
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, vdim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qr, kvr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    p = f"model.layers.{layer}"
    a = f"{p}.self_attn"
    w = {
        f"{p}.input_layernorm.weight": _norm(spec, f"{p}.input_layernorm", D),
        f"{p}.post_attention_layernorm.weight": _norm(spec, f"{p}.post_attention_layernorm", D),
        f"{a}.q_a_proj.weight": _linear(spec, f"{a}.q_a_proj", qr, D),
        f"{a}.q_a_layernorm.weight": _norm(spec, f"{a}.q_a_layernorm", qr),
        f"{a}.q_b_proj.weight": _linear(spec, f"{a}.q_b_proj", H * (nope + rope), qr),
        f"{a}.kv_a_proj_with_mqa.weight": _linear(spec, f"{a}.kv_a_proj_with_mqa", kvr + rope, D),
        f"{a}.kv_a_layernorm.weight": _norm(spec, f"{a}.kv_a_layernorm", kvr),
        f"{a}.kv_b_proj.weight": _linear(spec, f"{a}.kv_b_proj", H * (nope + vdim), kvr),
        f"{a}.o_proj.weight": _linear(spec, f"{a}.o_proj", D, H * vdim),
    }
    m = f"{p}.mlp"
    if layer < cfg["first_k_dense_replace"]:
        inter = cfg["intermediate_size"]
        w[f"{m}.gate_proj.weight"] = _linear(spec, f"{m}.gate_proj", inter, D)
        w[f"{m}.up_proj.weight"] = _linear(spec, f"{m}.up_proj", inter, D)
        w[f"{m}.down_proj.weight"] = _linear(spec, f"{m}.down_proj", D, inter)
        return w
    E, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    # Router logits ~ N(0, 1): sigmoid scores well spread; the correction bias is
    # large enough to change which experts win, as in trained checkpoints.
    w[f"{m}.gate.weight"] = _linear(spec, f"{m}.gate", E, D)
    w[f"{m}.gate.e_score_correction_bias"] = _normal(
        spec, f"{m}.gate.e_score_correction_bias", (E,), 0.05, mx.float32
    )
    for e in range(E):
        x = f"{m}.experts.{e}"
        w[f"{x}.gate_proj.weight"] = _linear(spec, f"{x}.gate_proj", inter, D)
        w[f"{x}.up_proj.weight"] = _linear(spec, f"{x}.up_proj", inter, D)
        w[f"{x}.down_proj.weight"] = _linear(spec, f"{x}.down_proj", D, inter)
    shared = inter * cfg["n_shared_experts"]
    s = f"{m}.shared_experts"
    w[f"{s}.gate_proj.weight"] = _linear(spec, f"{s}.gate_proj", shared, D)
    w[f"{s}.up_proj.weight"] = _linear(spec, f"{s}.up_proj", shared, D)
    w[f"{s}.down_proj.weight"] = _linear(spec, f"{s}.down_proj", D, shared)
    return w


def hub_outer_weights(spec: SynthSpec, cfg: dict[str, Any]) -> dict[str, mx.array]:
    """Embedding, final norm and LM head (Hub names)."""
    V, D = cfg["vocab_size"], cfg["hidden_size"]
    # A large head gain makes the argmax decisive, so bf16 rounding noise in the
    # stock model does not flip tokens on its own.
    head = _linear(spec, "lm_head", V, D, gain=4.0)
    # The end-of-text row is zero so that greedy decoding rarely stops early.
    head = mx.concatenate([mx.zeros((1, D), head.dtype), head[1:]], axis=0)
    return {
        "model.embed_tokens.weight": _normal(spec, "model.embed_tokens", (V, D), 1.0),
        "model.norm.weight": _norm(spec, "model.norm", D),
        "lm_head.weight": head,
    }


def _hub_weight_groups(spec, cfg) -> Iterator[dict[str, mx.array]]:
    yield hub_outer_weights(spec, cfg)
    for layer in range(cfg["num_hidden_layers"]):
        yield hub_layer_weights(spec, cfg, layer)


# ---------------------------------------------------------------- model


def _model_classes(cfg: dict[str, Any]):
    from mlx_lm.utils import _get_classes  # mlx-lm's own model-type lookup

    return _get_classes(config=cfg)


def _structure(spec: SynthSpec) -> tuple[nn.Module, dict[str, Any]]:
    """The (lazy, unloaded) model and the config its checkpoint carries."""
    cfg = model_config(spec)
    model_class, args_class = _model_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    quant = QUANTS[spec.quant]
    if quant is not None:
        from mlx_lm.utils import quantize_model

        mode, group_size, bits = quant
        # mlx-lm's converter, so the same layers are quantized (it prints a line).
        with contextlib.redirect_stdout(io.StringIO()):
            model, cfg = quantize_model(model, cfg, group_size, bits, mode=mode)
    return model, cfg


def _quantized_paths(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    return {
        path: (m.mode, m.group_size, m.bits)
        for path, m in model.named_modules()
        if "scales" in m and hasattr(m, "group_size")
    }


def _converted(model, quantized, hub: dict[str, mx.array]) -> dict[str, mx.array]:
    """Hub tensors -> the converter's layout: sanitize, then quantize where it would."""
    out = {}
    for name, w in model.sanitize(hub).items():
        path, _, leaf = name.rpartition(".")
        if leaf == "weight" and path in quantized:
            mode, group_size, bits = quantized[path]
            q = mx.quantize(w, group_size, bits, mode=mode)
            out[f"{path}.weight"], out[f"{path}.scales"] = q[0], q[1]
            if len(q) > 2:
                out[f"{path}.biases"] = q[2]
        else:
            out[name] = w
    return out


def _weight_groups(spec: SynthSpec, model, cfg) -> Iterator[dict[str, mx.array]]:
    """Evaluated tensor groups in the layout the checkpoint stores (one layer at a time)."""
    quantized = _quantized_paths(model)
    for hub in _hub_weight_groups(spec, model_config(spec)):
        group = hub if QUANTS[spec.quant] is None else _converted(model, quantized, hub)
        mx.eval(group)
        yield group


def build(spec: SynthSpec | str, progress: Callable[[int, int], None] | None = None):
    """The synthetic model and tokenizer in memory, as `mlx_lm.load` would return them.

    Same generator and conversion as `write`, so a benchmark on `build` measures the
    model a checkpoint written by `write` would load.
    """
    spec = SynthSpec.parse(spec) if isinstance(spec, str) else spec
    model, cfg = _structure(spec)
    weights: dict[str, mx.array] = {}
    total = cfg["num_hidden_layers"] + 1
    for i, group in enumerate(_weight_groups(spec, model, cfg)):
        weights.update(group if QUANTS[spec.quant] else model.sanitize(group))
        if progress:
            progress(i + 1, total)
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model, load_tokenizer_for(cfg)


# ---------------------------------------------------------------- checkpoint

SHARD_BYTES = 4 << 30


def write(
    spec: SynthSpec | str,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a checkpoint directory that `mlx_lm.load(out)` loads unchanged.

    `out` may be new, an empty directory, or (with `overwrite`) a checkpoint this
    module wrote (it holds MANIFEST); anything else raises SynthError and is left as it
    was. The files go to a temporary sibling that replaces `out` only once complete.
    """
    spec = SynthSpec.parse(spec) if isinstance(spec, str) else spec
    stamp = {"written_by": "zmlx.synth", "spec": spec.name}
    try:
        with safe_write.replacing(out, manifest=MANIFEST, overwrite=overwrite, stamp=stamp) as tmp:
            _write_files(spec, tmp, progress)
    except safe_write.OutputError as e:
        raise SynthError(str(e)) from None
    return Path(out)


def _write_files(spec: SynthSpec, tmp: Path, progress: Callable[[int, int], None] | None) -> None:
    model, cfg = _structure(spec)
    shards: list[dict[str, mx.array]] = [{}]
    files: list[Path] = []
    total = cfg["num_hidden_layers"] + 1

    def flush():
        path = tmp / f"model-{len(files) + 1:05d}.safetensors"
        mx.save_safetensors(str(path), shards[0], metadata={"format": "mlx"})
        files.append(path)
        shards[0] = {}

    index: dict[str, int] = {}
    size = 0
    for i, group in enumerate(_weight_groups(spec, model, cfg)):
        for name, arr in group.items():
            shards[0][name] = arr
            index[name] = len(files)
            size += arr.nbytes
        if sum(a.nbytes for a in shards[0].values()) >= SHARD_BYTES:
            flush()
        if progress:
            progress(i + 1, total)
    if shards[0]:
        flush()
    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for path, name in zip(files, names):
        path.rename(tmp / name)
    with open(tmp / "model.safetensors.index.json", "w") as f:
        weight_map = {k: names[v] for k, v in sorted(index.items())}
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f, indent=2)
    cfg = dict(cfg)
    cfg["zmlx_synth"] = {"spec": spec.name, "seed": spec.seed}
    with open(tmp / "config.json", "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
    write_tokenizer(tmp, cfg["vocab_size"])


def estimate_bytes(spec: SynthSpec | str) -> int:
    """Bytes of weights the model holds (what loading it costs in memory)."""
    spec = SynthSpec.parse(spec) if isinstance(spec, str) else spec
    cfg = model_config(spec)
    D, V, H = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    nope, rope, vdim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qr, kvr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    attn = qr * D + H * (nope + rope) * qr + (kvr + rope) * D + H * (nope + vdim) * kvr + D * H * vdim
    moe = 3 * D * cfg["moe_intermediate_size"] * (cfg["n_routed_experts"] + cfg["n_shared_experts"])
    dense = 3 * D * cfg["intermediate_size"]
    k = cfg["first_k_dense_replace"]
    n = cfg["num_hidden_layers"]
    params = 2 * V * D + n * attn + k * dense + (n - k) * moe
    quant = QUANTS[spec.quant]
    if quant is None:
        return params * 2
    mode, group, bits = quant
    # Packed weights plus, per group, a bf16 scale and bias (affine) or a uint8 scale (mxfp4).
    per_group = 4 if mode == "affine" else 1
    return int(params * (bits / 8 + per_group / group))


if __name__ == "__main__":  # python -m zmlx.synth: the `zmlx synth` command
    from zmlx.cli.synth import main

    main()
