"""Load what a user names: a synthetic spec, a checkpoint directory, or a Hub id."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from zmlx import synth


class ModelLoadError(ValueError):
    """The model argument names nothing zmlx can load; the message says what to do."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user passed
    kind: str  # "synth" | "path" | "hub"
    family: str | None
    quantization: str  # "bf16", "affine4/g64", ...
    # what the model stands for when it is not what its name says: a layer-faithful
    # synthetic preset's label (real per-layer shapes, fewer layers), else None
    label: str | None = None


def quantization_of(config: dict) -> str:
    q = config.get("quantization")
    if not q:
        return str(config.get("torch_dtype") or config.get("dtype") or "unquantized")
    mode = q.get("mode", "affine")
    return f"{mode}{q.get('bits')}/g{q.get('group_size')}"


def _check_path(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory: pass an mlx-lm checkpoint directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not an mlx-lm model: it has no config.json")
    if not any(path.glob("model*.safetensors")):
        raise ModelLoadError(f"{path} is not an mlx-lm model: it has no model*.safetensors")


def load(name: str, progress=None):
    """(model, tokenizer, ModelSource) for a spec, a path or a Hub id; ModelLoadError if not."""
    name = str(name)
    if synth.is_spec(name):
        try:
            spec = synth.SynthSpec.parse(name)
        except synth.SynthError as e:
            raise ModelLoadError(str(e)) from None
        model, tokenizer = synth.build(spec, progress=progress)
        cfg = synth.model_config(spec)
        return (
            model,
            tokenizer,
            ModelSource(spec.name, "synth", cfg["model_type"], spec.quantization, synth.layer_faithful(spec)),
        )

    import mlx_lm

    path = Path(name).expanduser()
    if path.exists():
        _check_path(path)
        kind = "path"
    elif _HUB_ID.match(name) and not name.startswith((".", "~")):
        kind = "hub"
    else:
        raise ModelLoadError(f"no such path: {name} (nor a Hub id like org/name or a synth: spec)")
    try:
        # return_config=True: three items (mlx-lm's annotation is the union of two and three)
        loaded = mlx_lm.load(str(path) if kind == "path" else name, return_config=True)
        model, tokenizer, config = cast("tuple[Any, Any, dict[str, Any]]", loaded)
    except Exception as e:  # mlx-lm raises many types for a model it cannot read
        where = "from the Hugging Face Hub" if kind == "hub" else f"from {path}"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load {name} {where}: {first}") from None
    label = (config.get("zmlx_synth") or {}).get("layer_faithful")  # a written layer-faithful preset
    return model, tokenizer, ModelSource(name, kind, config.get("model_type"), quantization_of(config), label)
