"""python -m zmlx.matrix run|history|report|merge|supersede: the ledger of what patterns are worth.

    run MODEL --patterns a,b --runs 3 --max-tokens 200 --notes TEXT [--ledger PATH]
    history [MODEL_SUBSTRING] [--json] [--ledger PATH]
    report [--json | --markdown] [--ledger PATH]
    merge OTHER_LEDGER [--ledger PATH]
    supersede LINE_ID... --reason TEXT [--ledger PATH]

The ledger is the user's own (`$ZMLX_LEDGER`, else ~/.cache/zmlx/matrix.jsonl) unless
--ledger names one: the project's `matrix.jsonl` is written only when asked for by name.
`run` measures stock and patched alternately in one process (`--patterns none`
measures stock against stock: the noise floor) and appends one line per pattern set.
"""

from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zmlx import synth, ui
from zmlx.bench import stamp
from zmlx.config import ConfigError, PatchConfig, default_ledger_path, env_overrides
from zmlx.matrix import ledger as L
from zmlx.matrix import summary as S

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="The ledger (matrix.jsonl) of what each pattern combination is worth.")

LedgerOpt = Annotated[Optional[Path], typer.Option(
    "--ledger", help="ledger file (default: $ZMLX_LEDGER, else ~/.cache/zmlx/matrix.jsonl)")]


def _ledger(path: Path | None) -> Path:
    return path.expanduser() if path is not None else default_ledger_path()


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


def _base_entry(model: str, patterns: list[str], notes: str, params: dict[str, Any],
                git: dict[str, Any]) -> dict[str, Any]:
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
        "command": shlex.join(["python", "-m", "zmlx.matrix", *sys.argv[1:]]),
        "env": env_overrides(),
        **params,
        "notes": notes,
    }


def _pattern_paths(patch: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per applied pattern: whether its kernel or its reference ran, and why."""
    if patch is None:
        return None
    return {n: {"path": r["path"], "backend": r["backend"], "fallbacks": r["fallbacks"],
                "modules": len(r["patched"]), "skipped": sorted({why for _, why in r["skipped"]})}
            for n, r in patch["patterns"].items() if r["patched"]}


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
    ledger: LedgerOpt = None,
    max_memory_gb: Annotated[Optional[float], typer.Option(
        help="memory to assume instead of the device's (a larger model is SKIP(RAM))")] = None,
    count_kernels: Annotated[bool, typer.Option(help="count CUDA kernels per token")] = True,
):
    """Measure MODEL stock vs patched and append one line per pattern set to the ledger."""
    from rich.progress import Progress

    from zmlx import cli_args
    from zmlx.backend import current as current_backend
    from zmlx.bench.harness import CONTROL, Variant, measure
    from zmlx.models import load
    from zmlx.patch.core import select_patterns

    with cli_args.one_line_errors(model):  # the checks validate and drift make, before any work
        cli_args.at_least(1, {"--runs": runs, "--max-tokens": max_tokens, "--prompt-tokens": prompt_tokens})
        cli_args.finite("--max-memory-gb", max_memory_gb, above=0)
        # None: the family's preset; (): none, stock vs stock
        sets = [cli_args.selection(p, "--patterns") for p in (patterns or [None])]
        cli_args.environment()
        cli_args.check_model_name(model)
    params = {"runs": runs, "max_tokens": max_tokens, "prompt_tokens": prompt_tokens}
    # Where the line goes and what code it measures are settled before anything is measured.
    try:
        ledger = L.check_writable(_ledger(ledger))
        git = stamp.git()
    except (L.LedgerPathError, stamp.GitStateError) as e:
        _fail(str(e))
    if len(sets) > 1:
        shared = f"{len(sets)} sets share one control"
        notes = f"{notes}; {shared}" if notes else shared

    need = estimate_model_bytes(model)
    budget, where = memory_budget(max_memory_gb)
    if need is not None and budget is not None and need > 0.9 * budget:
        family, quant = describe_without_loading(model)
        for names in sets:
            requested = [] if names == () else select_patterns(
                family, names, None, PatchConfig.from_env(), current_backend())[0]
            entry = _base_entry(model, requested, notes, params, git)
            entry.update({"family": family, "quantization": quant, "fidelity": "SKIP(RAM)"})
            entry["skip_reason"] = f"needs ~{need / 1e9:.1f} GB, {where} is {budget / 1e9:.1f} GB"
            L.append(entry, ledger)
        print(f"SKIP(RAM): {model} {entry['skip_reason']}; recorded in {ledger}")
        return

    err = ui.console(stderr=True)
    with cli_args.one_line_errors(model):  # bad input, or MLX unable to run the model here
        with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task(f"loading {model}", total=None)
            m, tok, source = load(model, progress=lambda i, n: progress.update(task, completed=i, total=n))
            variants = []
            for i, names in enumerate(sets):
                if names == ():
                    variants.append(Variant(f"control_repeat_{i}", note="stock vs stock: the noise floor"))
                else:
                    applied, why_not = select_patterns(source.family, names, None, PatchConfig.from_env(),
                                                       current_backend())
                    if not applied:  # a line would read as stock vs stock, which was not asked for
                        why = "; ".join(f"{n}: {w}" for n, w in why_not.items()) or (
                            f"model_type {source.family!r} has no zmlx patterns")
                        raise ConfigError(f"nothing to measure: no pattern applies to {model} ({why}); "
                                          "--patterns none measures stock vs stock")
                    variants.append(Variant(f"patched_{i}", tuple(applied)))
            progress.update(task, description="measuring", completed=0,
                            total=(len(variants) + 1) * (runs + 1))
            control, *measured = measure(
                m, tok, [CONTROL, *variants], runs=runs, max_tokens=max_tokens,
                prompt_tokens=prompt_tokens, count_kernels=count_kernels,
                on_step=lambda _: progress.advance(task),
            )

    entries = []
    for patched in measured:
        applied = list(patched.variant.patterns)
        if patched.patch is not None:
            applied = [n for n, r in patched.patch["patterns"].items() if r["patched"]]
        entry = _base_entry(source.name, applied, notes, params, git)
        entry["pattern_paths"] = _pattern_paths(patched.patch)
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


def _history_table(entries: list[dict[str, Any]], title: str, superseded: dict | None = None):
    from rich.table import Table

    superseded = superseded or {}
    t = Table(title=title)
    for col in ("line", "when", "model", "patterns", "device", "prompt", "fidelity", "stock tok/s",
                "patched tok/s", "speedup", "kernels/tok", "commit", "notes"):
        t.add_column(col, justify="right" if "tok/" in col or col in ("speedup", "prompt") else "left",
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
        lid = L.line_id(e)
        notes = f"{e.get('max_tokens', '?')} tok x {e.get('runs', '?')}; {e.get('notes', '')}".strip("; ")
        if lid in superseded:
            notes = f"SUPERSEDED: {superseded[lid]['reason']}; {notes}"
        t.add_row(
            lid, e["timestamp"][:16],
            f"{e['model']} ({e.get('quantization') or '?'})".replace("synth:", ""),
            ",".join(e["patterns"]) or "none (stock vs stock)",
            e["device"]["name"], S.fmt(e.get("prompt_tokens"), "d") if e.get("prompt_tokens") else "?",
            fid,
            S.fmt(e.get("stock_decode_tps_median")),
            S.fmt(e.get("decode_tps_median")),
            S.fmt(e.get("speedup"), ".3f"),
            f"{S.fmt(stock_k, '.0f')} -> {S.fmt(kernels, '.0f')}" if kernels is not None else "-",
            S.commit_label(e), notes,
        )
    return t


@app.command()
def history(
    model_substring: Annotated[
        Optional[str], typer.Argument(help="only models whose name contains this")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    ledger: LedgerOpt = None,
):
    """Every ledger line (optionally for one model), oldest first; superseded ones marked."""
    ledger = _ledger(ledger)
    data = L.read(ledger)
    _warn_problems(ledger, data.problems)
    entries = L.select(data.entries, model_substring)
    if as_json:
        print(json.dumps([{**e, "line": L.line_id(e), "superseded": data.superseded.get(L.line_id(e))}
                          for e in entries], indent=2))
        return
    ui.console().print(_history_table(entries, f"{ledger}: {len(entries)} line(s)", data.superseded))


@app.command()
def report(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="print Markdown tables")] = False,
    device: Annotated[Optional[str], typer.Option(help="only devices whose name contains this")] = None,
    ledger: LedgerOpt = None,
):
    """What each pattern set is worth, per model, device and prompt length (latest current
    line of each), every ratio next to the noise floor of the same device and prompt length."""
    from rich.table import Table

    ledger = _ledger(ledger)
    data = L.read(ledger)
    _warn_problems(ledger, data.problems)
    current = data.current()
    if device:
        current = [e for e in current if device.lower() in e["device"]["name"].lower()]
    rows = S.summarize(current)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if as_markdown:
        print(S.markdown(rows), end="")
        return
    console = ui.console()
    if not rows:
        console.print(f"{ledger}: no measurements yet")
        return
    for (model, quant, dev), group in S.groups(rows).items():
        t = Table(title=f"{model} ({quant}) on {dev}")
        for col in S.COLUMNS:
            t.add_column(col, justify="left" if col in ("line", "patterns", "fidelity", "noise floor",
                                                         "commit") else "right",
                         no_wrap=col in ("line", "noise floor", "commit", "speedup"))
        for r in group:
            c = S.cells(r)
            t.add_row(*(c[col] for col in S.COLUMNS))
        console.print(t)
    if data.superseded:
        console.print(f"{len(data.superseded)} superseded line(s) left out: matrix history shows them")


@app.command()
def merge(
    source: Annotated[Path, typer.Argument(help="a ledger written elsewhere (e.g. on the GPU machine)")],
    ledger: LedgerOpt = None,
):
    """Append another ledger's lines (skipping ones already here) to this ledger; a line
    whose commit is not in this repository is refused."""
    ledger = _ledger(ledger)
    if not source.is_file():
        _fail(f"no such ledger: {source}")
    try:
        L.check_writable(ledger)
    except L.LedgerPathError as e:
        _fail(str(e))
    n, problems = L.merge(source, ledger, commit_exists=stamp.commit_exists)
    _warn_problems(source, problems)
    print(f"merged {n} line(s) from {source} into {ledger}")


@app.command()
def supersede(
    ids: Annotated[list[str], typer.Argument(help="ids of the lines (matrix history shows them)")],
    reason: Annotated[str, typer.Option(help="what was wrong with the measurement")] = "",
    ledger: LedgerOpt = None,
):
    """Mark ledger lines superseded (a known-bad harness, say): appends one line each,
    changes none; report leaves them out, history marks them."""
    ledger = _ledger(ledger)
    if not ledger.is_file():
        _fail(f"no such ledger: {ledger}")
    try:
        done = L.supersede(ledger, ids, reason,
                           datetime.now(timezone.utc).isoformat(timespec="seconds"))
    except L.LedgerError as e:
        _fail(str(e))
    print(f"marked {len(done)} line(s) superseded in {ledger}: {', '.join(done)}")


def main():
    app()
