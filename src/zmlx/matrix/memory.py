"""What a model needs and what this machine has, told before the model is loaded: a run
whose model cannot fit is recorded as SKIP(RAM) instead of being attempted."""

from __future__ import annotations

import json
from pathlib import Path

from zmlx import synth
from zmlx.bench import stamp

# A model whose weights take more than this share of the memory budget is not run: the
# activations, the KV cache and MLX's buffers need the rest.
HEADROOM = 0.9


def estimate_model_bytes(model: str) -> int | None:
    """Weight bytes of what `model` names, without loading it (None if unknown)."""
    if synth.is_spec(model):
        return synth.estimate_bytes(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return None


def describe_without_loading(model: str) -> tuple[str | None, str | None]:
    """(family, quantization) from a spec or a checkpoint's config.json; (None, None) if unknown."""
    from zmlx.models import quantization_of

    if synth.is_spec(model):
        try:
            spec = synth.SynthSpec.parse(model)
        except synth.SynthError:
            return None, None
        return spec.family, spec.quantization
    config = Path(model).expanduser() / "config.json"
    try:
        cfg = json.loads(config.read_text())
        return cfg.get("model_type"), quantization_of(cfg)
    except (OSError, ValueError):
        return None, None


def memory_budget(max_memory_gb: float | None) -> tuple[int | None, str]:
    """(bytes a run may use, where that figure comes from): `max_memory_gb` when given, else
    the device's memory, else the host's available memory."""
    if max_memory_gb is not None:
        return int(max_memory_gb * 1e9), "--max-memory-gb"
    dev = stamp.device()
    if dev["memory_bytes"]:
        return dev["memory_bytes"], "device memory"
    return stamp.host_memory(available=True), "available host memory"


def too_large(model: str, max_memory_gb: float | None) -> str | None:
    """Why `model` cannot run within the memory budget ("needs ~X GB, device memory is Y
    GB"), or None when it fits or either figure is unknown."""
    need = estimate_model_bytes(model)
    budget, where = memory_budget(max_memory_gb)
    if need is None or budget is None or need <= HEADROOM * budget:
        return None
    return f"needs ~{need / 1e9:.1f} GB, {where} is {budget / 1e9:.1f} GB"
