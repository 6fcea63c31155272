"""python -m zmlx.matrix run|history|report|merge: the ledger of what patterns are worth.

    run MODEL --patterns a,b --runs 3 --max-tokens 200 --notes TEXT [--ledger PATH]
    history [MODEL_SUBSTRING] [--json] [--ledger PATH]
    report [--json] [--ledger PATH]
    merge OTHER_LEDGER [--ledger PATH]

The ledger is `matrix.jsonl` in the current directory unless --ledger says otherwise.
`run` measures stock and patched alternately in one process (`--patterns none`
measures stock against stock: the noise floor) and appends one line.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zmlx import synth, ui
from zmlx.bench import stamp
from zmlx.config import ConfigError, PatchConfig, split_names
from zmlx.matrix import ledger as L

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="The ledger (matrix.jsonl) of what each pattern combination is worth.")

LedgerOpt = Annotated[Path, typer.Option("--ledger", help="ledger file")]


def _fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _warn_problems(path: Path, problems: list[str]) -> None:
    for p in problems:
        print(f"warning: {path} {p} (skipped)", file=sys.stderr)


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
    if max_memory_gb is not None:
        return int(max_memory_gb * 1e9), "--max-memory-gb"
    dev = stamp.device()
    if dev["memory_bytes"]:
        return dev["memory_bytes"], "device memory"
    return stamp.host_memory(available=True), "available host memory"


def _base_entry(model: str, patterns: list[str], notes: str, params: dict[str, Any]) -> dict[str, Any]:
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
        "git": stamp.git(),
        **params,
        "notes": notes,
    }


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="checkpoint directory, Hub id or synth: spec")],
    patterns: Annotated[Optional[list[str]], typer.Option(
        help="comma-separated patterns; default: the family's preset; 'none': stock vs stock. "
             "Repeat the option to measure several sets against one shared, interleaved control "
             "(one ledger line per set)")] = None,
    runs: Annotated[int, typer.Option(help="timed runs of each side")] = 3,
    max_tokens: Annotated[int, typer.Option(help="tokens generated per run")] = 200,
    prompt_tokens: Annotated[int, typer.Option(help="prompt length in tokens")] = 32,
    notes: Annotated[str, typer.Option(help="free text kept with the line")] = "",
    ledger: LedgerOpt = L.DEFAULT_PATH,
    max_memory_gb: Annotated[Optional[float], typer.Option(
        help="memory to assume instead of the device's (a larger model is SKIP(RAM))")] = None,
    count_kernels: Annotated[bool, typer.Option(help="count CUDA kernels per token")] = True,
):
    """Measure MODEL stock vs patched and append one line per pattern set to the ledger."""
    from rich.progress import Progress

    from zmlx.backend import current as current_backend
    from zmlx.bench.harness import CONTROL, Variant, measure
    from zmlx.models import ModelLoadError, load
    from zmlx.patch.core import check_names, select_patterns

    if runs < 1 or max_tokens < 1 or prompt_tokens < 1:
        _fail("--runs, --max-tokens and --prompt-tokens must be at least 1")
    sets = [split_names(p) for p in (patterns or [None])]  # None: the family's preset
    try:
        for names in sets:
            if names != ("none",):
                check_names(names or (), "--patterns")
    except ConfigError as e:
        _fail(str(e))
    params = {"runs": runs, "max_tokens": max_tokens, "prompt_tokens": prompt_tokens}
    if len(sets) > 1:
        shared = f"{len(sets)} sets share one control"
        notes = f"{notes}; {shared}" if notes else shared

    need = estimate_model_bytes(model)
    budget, where = memory_budget(max_memory_gb)
    if need is not None and budget is not None and need > 0.9 * budget:
        family, quant = describe_without_loading(model)
        for names in sets:
            requested = [] if names == ("none",) else select_patterns(
                family, names, None, PatchConfig.from_env(), current_backend())[0]
            entry = _base_entry(model, requested, notes, params)
            entry.update({"family": family, "quantization": quant, "fidelity": "SKIP(RAM)"})
            entry["skip_reason"] = f"needs ~{need / 1e9:.1f} GB, {where} is {budget / 1e9:.1f} GB"
            L.append(entry, ledger)
        print(f"SKIP(RAM): {model} {entry['skip_reason']}; recorded in {ledger}")
        return

    err = ui.console(stderr=True)
    try:
        with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task(f"loading {model}", total=None)
            m, tok, source = load(model, progress=lambda i, n: progress.update(task, completed=i, total=n))
            variants = []
            for i, names in enumerate(sets):
                if names == ("none",):
                    variants.append(Variant(f"control_repeat_{i}", note="stock vs stock: the noise floor"))
                else:
                    applied, _ = select_patterns(source.family, names, None, PatchConfig.from_env(),
                                                 current_backend())
                    variants.append(Variant(f"patched_{i}", tuple(applied)))
            progress.update(task, description="measuring", completed=0,
                            total=(len(variants) + 1) * (runs + 1))
            control, *measured = measure(
                m, tok, [CONTROL, *variants], runs=runs, max_tokens=max_tokens,
                prompt_tokens=prompt_tokens, count_kernels=count_kernels,
                on_step=lambda _: progress.advance(task),
            )
    except (ModelLoadError, ConfigError) as e:
        _fail(str(e))

    entries = []
    for patched in measured:
        applied = list(patched.variant.patterns)
        if patched.patch is not None:
            applied = [n for n, r in patched.patch["patterns"].items() if r["patched"]]
        entry = _base_entry(source.name, applied, notes, params)
        s, p = control.stat("decode_tps"), patched.stat("decode_tps")
        entry.update({
            "family": source.family,
            "quantization": source.quantization,
            "fidelity": patched.fidelity["verdict"],
            "fidelity_detail": patched.fidelity,
            "decode_tps": [r.decode_tps for r in patched.runs],
            "decode_tps_median": p["median"],
            "prefill_tps": [r.prompt_tps for r in patched.runs],
            "prefill_tps_median": patched.stat("prompt_tps")["median"],
            "stock_decode_tps": [r.decode_tps for r in control.runs],
            "stock_decode_tps_median": s["median"],
            "stock_prefill_tps": [r.prompt_tps for r in control.runs],
            "stock_prefill_tps_median": control.stat("prompt_tps")["median"],
            "speedup": p["median"] / s["median"],
            "kernels_per_token": patched.kernels_per_token,
            "stock_kernels_per_token": control.kernels_per_token,
            "gpu_us_per_token": patched.gpu_us_per_token,
            "stock_gpu_us_per_token": control.gpu_us_per_token,
            "kernels_note": patched.kernels_note,
            "peak_memory_gb": max(r.peak_memory_gb for r in patched.runs),
            "stock_peak_memory_gb": max(r.peak_memory_gb for r in control.runs),
        })
        L.append(entry, ledger)
        entries.append(entry)
    ui.console().print(_history_table(entries, f"appended to {ledger}"))


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def _history_table(entries: list[dict[str, Any]], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("when", "model", "patterns", "device", "fidelity", "stock tok/s", "patched tok/s",
                "speedup", "kernels/tok", "notes"):
        t.add_column(col, justify="right" if "tok/" in col or col == "speedup" else "left",
                     overflow="fold")
    for e in entries:
        fid = e["fidelity"]
        if fid == "SKIP(RAM)":
            fid = f"SKIP(RAM): {e.get('skip_reason', '')}"
        elif e.get("fidelity_detail"):
            d = e["fidelity_detail"]
            fid = f"{fid} {d.get('identical')}/{d.get('total')}"
        kernels = e.get("kernels_per_token")
        stock_k = e.get("stock_kernels_per_token")
        t.add_row(
            e["timestamp"][:16],
            f"{e['model']} ({e.get('quantization') or '?'})".replace("synth:", ""),
            ",".join(e["patterns"]) or "none (stock vs stock)",
            e["device"]["name"],
            fid,
            _fmt(e.get("stock_decode_tps_median")),
            _fmt(e.get("decode_tps_median")),
            _fmt(e.get("speedup"), ".3f"),
            f"{_fmt(stock_k, '.0f')} -> {_fmt(kernels, '.0f')}" if kernels is not None else "-",
            f"{e.get('max_tokens', '?')} tok x {e.get('runs', '?')}; {e.get('notes', '')}".strip("; "),
        )
    return t


@app.command()
def history(
    model_substring: Annotated[
        Optional[str], typer.Argument(help="only models whose name contains this")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    ledger: LedgerOpt = L.DEFAULT_PATH,
):
    """Every ledger line (optionally for one model), oldest first."""
    data = L.read(ledger)
    _warn_problems(ledger, data.problems)
    entries = L.select(data.entries, model_substring)
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    ui.console().print(_history_table(entries, f"{ledger}: {len(entries)} line(s)"))


def summarize(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Latest line per (model, device, patterns, max_tokens), grouped by model and device."""
    latest: dict[tuple, dict[str, Any]] = {}
    counts: dict[tuple, int] = {}
    for e in entries:
        key = (e["model"], e["device"]["name"], tuple(e["patterns"]), e.get("max_tokens"))
        counts[key] = counts.get(key, 0) + 1
        if key not in latest or e["timestamp"] >= latest[key]["timestamp"]:
            latest[key] = e
    rows = []
    for key in sorted(latest, key=lambda k: (k[0], k[1], k[3] or 0, k[2])):
        e = latest[key]
        rows.append({
            "model": e["model"], "quantization": e.get("quantization"), "device": e["device"]["name"],
            "patterns": e["patterns"], "max_tokens": e.get("max_tokens"), "runs": e.get("runs"),
            "stock_decode_tps": e.get("stock_decode_tps_median"),
            "patched_decode_tps": e.get("decode_tps_median"), "speedup": e.get("speedup"),
            "fidelity": e["fidelity"], "kernels_per_token": e.get("kernels_per_token"),
            "stock_kernels_per_token": e.get("stock_kernels_per_token"),
            "gpu_us_per_token": e.get("gpu_us_per_token"),
            "stock_gpu_us_per_token": e.get("stock_gpu_us_per_token"),
            "measurements": counts[key], "timestamp": e["timestamp"],
        })
    return rows


@app.command()
def report(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    ledger: LedgerOpt = L.DEFAULT_PATH,
):
    """What each pattern set is worth, per model and device (latest measurement of each)."""
    from rich.table import Table

    data = L.read(ledger)
    _warn_problems(ledger, data.problems)
    rows = summarize(data.entries)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    console = ui.console()
    if not rows:
        console.print(f"{ledger}: no measurements yet")
        return
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["model"], r["quantization"], r["device"]), []).append(r)
    for (model, quant, device), group in groups.items():
        t = Table(title=f"{model} ({quant}) on {device}")
        for col in ("patterns", "tokens", "stock tok/s", "patched tok/s", "speedup", "fidelity",
                    "kernels/tok", "GPU µs/tok", "lines"):
            t.add_column(col, justify="left" if col in ("patterns", "fidelity") else "right")
        for r in group:
            k, sk = r["kernels_per_token"], r["stock_kernels_per_token"]
            g, sg = r["gpu_us_per_token"], r["stock_gpu_us_per_token"]
            t.add_row(
                ",".join(r["patterns"]) or "none (noise floor)",
                f"{r['max_tokens']} x {r['runs']}",
                _fmt(r["stock_decode_tps"]), _fmt(r["patched_decode_tps"]), _fmt(r["speedup"], ".3f"),
                r["fidelity"], f"{_fmt(sk, '.0f')} -> {_fmt(k, '.0f')}" if k is not None else "-",
                f"{_fmt(sg, '.0f')} -> {_fmt(g, '.0f')}" if g is not None else "-",
                str(r["measurements"]),
            )
        console.print(t)


@app.command()
def merge(
    source: Annotated[Path, typer.Argument(help="a ledger written elsewhere (e.g. on the GPU machine)")],
    ledger: LedgerOpt = L.DEFAULT_PATH,
):
    """Append another ledger's lines (skipping ones already here) to this ledger."""
    if not source.is_file():
        _fail(f"no such ledger: {source}")
    n, problems = L.merge(source, ledger)
    _warn_problems(source, problems)
    print(f"merged {n} line(s) from {source} into {ledger}")


def main():
    app()
