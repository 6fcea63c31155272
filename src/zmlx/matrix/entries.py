"""The ledger lines `matrix run` writes: what to measure for each requested pattern set,
and one line per set, measured or skipped (SKIP(RAM)). Appending them is zmlx.matrix.ledger's."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

from zmlx.backend import Backend
from zmlx.bench import stamp
from zmlx.bench.harness import Variant, VariantResult
from zmlx.config import ConfigError, PatchConfig, env_overrides
from zmlx.matrix import ledger as L
from zmlx.patch.core import select_patterns


def base_entry(
    model: str, patterns: list[str], notes: str, params: dict[str, Any], git: dict[str, Any], command: str
) -> dict[str, Any]:
    """The fields every line has: when, what, where, with which code, and how it was run."""
    dev = stamp.device()
    return {
        "schema": L.SCHEMA,
        "schema_version": L.SCHEMA_VERSION,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "family": None,
        "quantization": None,
        "patterns": patterns,
        "device": {"name": dev["name"], "backend": dev["backend"]},
        "versions": stamp.versions(),
        "git": git,
        "command": command,
        "env": env_overrides(),
        **params,
        "notes": notes,
    }


def pattern_paths(patch: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per applied pattern: whether its kernel or its reference ran, and why."""
    if patch is None:
        return None
    return {
        n: {
            "path": r["path"],
            "backend": r["backend"],
            "fallbacks": r["fallbacks"],
            "modules": len(r["patched"]),
            "skipped": sorted({why for _, why in r["skipped"]}),
        }
        for n, r in patch["patterns"].items()
        if r["patched"]
    }


def variants(
    model: str,
    family: str | None,
    sets: Sequence[tuple[str, ...] | None],
    backend: Backend,
    preset: str | None = None,
) -> list[Variant]:
    """One variant per pattern set (None: the family's `preset`; (): stock vs stock, the noise
    floor). ConfigError when a set applies no pattern to this model: its line would read as
    stock vs stock, which was not asked for."""
    out = []
    for i, names in enumerate(sets):
        if names == ():
            out.append(Variant(f"control_repeat_{i}", note="stock vs stock: the noise floor"))
            continue
        applied, why_not = select_patterns(family, names, None, PatchConfig.from_env(), backend, preset)
        if not applied:
            why = "; ".join(f"{n}: {w}" for n, w in why_not.items()) or (
                f"model_type {family!r} has no zmlx patterns"
            )
            raise ConfigError(
                f"nothing to measure: no pattern applies to {model} ({why}); "
                "--patterns none measures stock vs stock"
            )
        out.append(Variant(f"patched_{i}", tuple(applied)))
    return out


def skipped_for_memory(
    model: str,
    sets: Sequence[tuple[str, ...] | None],
    reason: str,
    backend: Backend,
    preset: str | None = None,
    **base: Any,
) -> list[dict[str, Any]]:
    """One SKIP(RAM) line per pattern set, with the patterns it would have applied;
    `base`: base_entry's notes, params, git and command."""
    from zmlx.matrix.memory import describe_without_loading

    family, quant = describe_without_loading(model)
    entries = []
    for names in sets:
        requested = (
            []
            if names == ()
            else select_patterns(family, names, None, PatchConfig.from_env(), backend, preset)[0]
        )
        entry = base_entry(model, requested, **base)
        entry.update(
            {"family": family, "quantization": quant, "fidelity": "SKIP(RAM)", "skip_reason": reason}
        )
        entries.append(entry)
    return entries


def _stat(result: VariantResult, key: str) -> dict[str, float]:
    stat = result.stat(key)
    if stat is None:  # measure() times every variant it does not skip
        raise ValueError(f"{result.variant.name} has no timed runs")
    return stat


def measured(source, control: VariantResult, patched: VariantResult, **base: Any) -> dict[str, Any]:
    """The line of one measured pattern set against the shared control; `source`: the
    loaded model's zmlx.models.ModelSource; `base`: base_entry's notes, params, git and command."""
    applied = list(patched.variant.patterns)
    if patched.patch is not None:
        applied = [n for n, r in patched.patch["patterns"].items() if r["patched"]]
    entry = base_entry(source.name, applied, **base)
    entry["pattern_paths"] = pattern_paths(patched.patch)
    s, p = _stat(control, "decode_tps"), _stat(patched, "decode_tps")
    if source.label:  # a layer-faithful synthetic model says so in its every line
        entry["model_label"] = source.label
    entry.update(
        {
            "family": source.family,
            "quantization": source.quantization,
            "fidelity": patched.fidelity["verdict"],
            "fidelity_detail": patched.fidelity,
            "decode_tps": [r.decode_tps for r in patched.runs],
            "decode_tps_median": p["median"],
            "prefill_tps": [r.prompt_tps for r in patched.runs],
            "prefill_tps_median": _stat(patched, "prompt_tps")["median"],
            "stock_decode_tps": [r.decode_tps for r in control.runs],
            "stock_decode_tps_median": s["median"],
            "stock_prefill_tps": [r.prompt_tps for r in control.runs],
            "stock_prefill_tps_median": _stat(control, "prompt_tps")["median"],
            "speedup": p["median"] / s["median"],
            "kernels_per_token": patched.kernels_per_token,
            "stock_kernels_per_token": control.kernels_per_token,
            "gpu_us_per_token": patched.gpu_us_per_token,
            "stock_gpu_us_per_token": control.gpu_us_per_token,
            "kernels_note": patched.kernels_note,
            "issue_ms_per_step": patched.issue_ms_per_step,
            "stock_issue_ms_per_step": control.issue_ms_per_step,
            "issue_note": patched.issue_note
            or (f"stock: {control.issue_note}" if control.issue_note else ""),
            "build_ms_per_step": patched.build_ms_per_step,
            "stock_build_ms_per_step": control.build_ms_per_step,
            "peak_memory_gb": max(r.peak_memory_gb for r in patched.runs),
            "stock_peak_memory_gb": max(r.peak_memory_gb for r in control.runs),
        }
    )
    if patched.compiled_decode is not None:  # of its last timed run (each run is one patch)
        entry["compiled_decode"] = patched.compiled_decode
    return entry
