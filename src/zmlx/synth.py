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
import functools
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from zmlx import safe_write
from zmlx.synth_families import FAMILIES as OTHER_FAMILIES
from zmlx.synth_families import glm4_moe_lite
from zmlx.synth_families.base import make, text_config
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
    """config.json of the bf16 checkpoint (Hub layout, or mlx-lm's where the family says)."""
    if spec.family == "glm4_moe_lite":
        return {**GLM4_MOE_LITE_COMMON, **FAMILIES[spec.family][spec.preset]}
    return OTHER_FAMILIES[spec.family].config(spec.preset)


def layer_faithful(spec: SynthSpec) -> str | None:
    """The label of a layer-faithful preset (real per-layer shapes, fewer layers), else None.

    The preset's name says it too (`layers4`), so every report and ledger line that names
    the model carries it.
    """
    family = OTHER_FAMILIES.get(spec.family)
    return family.faithful.get(spec.preset) if family else None


# ---------------------------------------------------------------- weights


def _hub_weight_groups(spec: SynthSpec, cfg: dict[str, Any]) -> Iterator[dict[str, mx.array]]:
    """The checkpoint's tensors in its stored layout: embedding/norm/head, then one group per layer."""
    layers = text_config(cfg)["num_hidden_layers"]
    if spec.family == "glm4_moe_lite":
        yield glm4_moe_lite.hub_outer_weights(spec.seed, cfg)
        for layer in range(layers):
            yield glm4_moe_lite.hub_layer_weights(spec.seed, cfg, layer)
        return
    family = OTHER_FAMILIES[spec.family]
    for part in (None, *range(layers)):
        yield {name: make(spec.seed, name, t) for name, t in family.tensors(cfg, part).items()}


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


def _sanitize(spec: SynthSpec, model, group: dict[str, mx.array]) -> dict[str, mx.array]:
    """mlx-lm's sanitize of one group of the stored tensors."""
    family = OTHER_FAMILIES.get(spec.family)
    if family is not None and family.sanitize_group is not None:
        return family.sanitize_group(model, group)
    return model.sanitize(group)


def _converted(spec, model, quantized, hub: dict[str, mx.array]) -> dict[str, mx.array]:
    """Hub tensors -> the converter's layout: sanitize, then quantize where it would."""
    out = {}
    for name, w in _sanitize(spec, model, hub).items():
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
        group = hub if QUANTS[spec.quant] is None else _converted(spec, model, quantized, hub)
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
    total = text_config(cfg)["num_hidden_layers"] + 1
    for i, group in enumerate(_weight_groups(spec, model, cfg)):
        weights.update(group if QUANTS[spec.quant] else _sanitize(spec, model, group))
        if progress:
            progress(i + 1, total)
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model, load_tokenizer_for(text_config(cfg))


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
    if label := layer_faithful(spec):
        stamp["layer_faithful"] = label
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
    total = text_config(cfg)["num_hidden_layers"] + 1

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
    if label := layer_faithful(spec):
        cfg["zmlx_synth"]["layer_faithful"] = label
    with open(tmp / "config.json", "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
    write_tokenizer(tmp, text_config(cfg)["vocab_size"])


@functools.lru_cache(maxsize=64)
def _estimate(spec: SynthSpec) -> int:
    # The model's own (lazy, never evaluated) parameters, bf16 as a checkpoint stores them,
    # quantized by mlx-lm's converter: exact whatever the family.
    cfg = model_config(spec)
    model_class, args_class = _model_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    # bf16 but where mlx-lm keeps float32 (its cast_predicate: e.g. the router's correction bias).
    keep = getattr(model, "cast_predicate", lambda name: True)
    params = cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))
    model.update(tree_unflatten([(k, v.astype(mx.bfloat16)) for k, v in params if keep(k)]))
    quant = QUANTS[spec.quant]
    if quant is not None:
        from mlx_lm.utils import quantize_model

        mode, group_size, bits = quant
        with contextlib.redirect_stdout(io.StringIO()):
            model, _ = quantize_model(model, cfg, group_size, bits, mode=mode)
    params = cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))
    return sum(v.nbytes for _, v in params)


def estimate_bytes(spec: SynthSpec | str) -> int:
    """Bytes of weights the model holds (what loading it costs in memory)."""
    return _estimate(SynthSpec.parse(spec) if isinstance(spec, str) else spec)


if __name__ == "__main__":  # python -m zmlx.synth: the `zmlx synth` command
    from zmlx.cli.synth import main

    main()
