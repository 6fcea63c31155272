"""`zmlx matrix` / `python -m zmlx.matrix run|history|report|merge|supersede`: the ledger
of what patterns are worth.

    run MODEL --patterns a,b --runs 3 --max-tokens 200 --notes TEXT [--emulate-metal] [--ledger PATH]
    history [MODEL_SUBSTRING] [--json] [--ledger PATH]
    report [--json | --markdown] [--ledger PATH]
    merge OTHER_LEDGER [--ledger PATH]
    supersede LINE_ID... --reason TEXT [--ledger PATH]

The ledger is the user's own (`$ZMLX_LEDGER`, else ~/.cache/zmlx/matrix.jsonl) unless
--ledger names one: the project's `matrix.jsonl` is written only when asked for by name.
`run` measures stock and patched alternately in one process (`--patterns none`
measures stock against stock: the noise floor) and appends one line per pattern set
(the lines are zmlx.matrix.entries', the file zmlx.matrix.ledger's).
"""

from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from zmlx import ui
from zmlx.bench import stamp
from zmlx.cli import args as cli_args
from zmlx.config import default_ledger_path
from zmlx.matrix import entries as E
from zmlx.matrix import ledger as L
from zmlx.matrix import summary as S
from zmlx.matrix.memory import too_large

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="The ledger (matrix.jsonl) of what each pattern combination is worth.",
)

LedgerOpt = Annotated[
    Optional[Path],
    typer.Option("--ledger", help="ledger file (default: $ZMLX_LEDGER, else ~/.cache/zmlx/matrix.jsonl)"),
]


def _ledger(path: Path | None) -> Path:
    """The ledger every command reads or writes: --ledger, else the user's; a directory is
    refused here, once, for every command (history and report read it too)."""
    resolved = path.expanduser() if path is not None else default_ledger_path()
    if resolved.is_dir():
        _fail(f"ledger {resolved} is a directory: give a file, e.g. {resolved / 'matrix.jsonl'}")
    return resolved


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _warn_problems(path: Path, problems: list[str]) -> None:
    for p in problems:
        print(f"warning: {path} {p} (skipped)", file=sys.stderr)


@app.command()
def run(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="checkpoint directory, Hub id or synth: spec")],
    patterns: Annotated[
        Optional[list[str]],
        typer.Option(
            help="comma-separated patterns; default: the family's preset; 'none': stock vs stock. "
            "Repeat the option to measure several sets against one shared, interleaved control "
            "(one ledger line per set)"
        ),
    ] = None,
    preset: Annotated[Optional[str], typer.Option(help=cli_args.PRESET_HELP)] = None,
    runs: Annotated[int, typer.Option(help="timed runs of each side")] = 3,
    max_tokens: Annotated[int, typer.Option(help="tokens generated per run")] = 200,
    prompt_tokens: Annotated[int, typer.Option(help="prompt length in tokens")] = 32,
    notes: Annotated[str, typer.Option(help="free text kept with the line")] = "",
    ledger: LedgerOpt = None,
    max_memory_gb: Annotated[
        Optional[float],
        typer.Option(help="memory to assume instead of the device's (a larger model is SKIP(RAM))"),
    ] = None,
    count_kernels: Annotated[bool, typer.Option(help="count CUDA kernels per token")] = True,
    issue_time: Annotated[bool, typer.Option(help="time the host's issue of a decode step")] = True,
    prefill_once: Annotated[
        bool,
        typer.Option(
            "--prefill-once",
            help="prefill the prompt once per set, at its warm-up, and start every run from that "
            "cache (long prompts: the runs then time decode only; prompt tok/s is that one prefill's)",
        ),
    ] = False,
    accuracy: Annotated[
        Optional[bool],
        typer.Option(
            "--accuracy/--no-accuracy",
            help="judge each set by the accuracy rule against a float32 reference model "
            "(default: on when twice the model's size fits in memory)",
        ),
    ] = None,
    emulate_metal: Annotated[
        bool,
        typer.Option(
            "--emulate-metal",
            help="run the kernels' Metal bodies emulated on the CPU (MLX's CPU backend, g++): judges "
            "how they compute, not their speed; the line's backend is metal-emulated",
        ),
    ] = False,
):
    """Measure MODEL stock vs patched and append one line per pattern set to the ledger.
    A set whose tokens differ from stock's is ACCURATE when the accuracy rule holds
    (zmlx.accuracy), else FAIL."""
    from rich.progress import Progress

    from zmlx.backend import current as current_backend
    from zmlx.bench.harness import CONTROL, measure
    from zmlx.cli.validate import accuracy_by_default

    with cli_args.one_line_errors(model):  # the checks validate and drift make, before any work
        cli_args.at_least(1, {"--runs": runs, "--max-tokens": max_tokens, "--prompt-tokens": prompt_tokens})
        cli_args.finite("--max-memory-gb", max_memory_gb, above=0)
        # None: the family's preset; (): none, stock vs stock
        asked: list[str | None] = list(patterns) if patterns else [None]
        sets = [cli_args.selection(p, "--patterns") for p in asked]
        preset = cli_args.preset_option(preset)
        cli_args.environment()
        cli_args.check_model_name(model)
    params: dict[str, Any] = {"runs": runs, "max_tokens": max_tokens, "prompt_tokens": prompt_tokens}
    if prefill_once:
        params["prefill_once"] = True
        once = "prompt prefilled once per set (--prefill-once)"
        notes = f"{notes}; {once}" if notes else once
    # Where the line goes and what code it measures are settled before anything is measured.
    try:
        ledger = L.check_writable(_ledger(ledger))
        git = stamp.git()
    except (L.LedgerPathError, stamp.GitStateError) as e:
        _fail(str(e))
    if len(sets) > 1:
        shared = f"{len(sets)} sets share one control"
        notes = f"{notes}; {shared}" if notes else shared
    if emulate_metal:  # until the command returns: every kernel dispatches as on Metal, emulated
        from zmlx.kernels.metal_emu import dispatch

        if (why := dispatch.refusal()) is not None:
            _fail(f"--emulate-metal: {why}")
        ctx.with_resource(dispatch.emulated())
        emulation = "Metal bodies emulated on the CPU (tok/s are the emulation's)"
        notes = f"{notes}; {emulation}" if notes else emulation
    base = {
        "notes": notes,
        "params": params,
        "git": git,
        # as typed: `python -m zmlx.matrix run ...` or `zmlx matrix run ...`
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
    }

    if (why := too_large(model, max_memory_gb)) is not None:
        for entry in E.skipped_for_memory(model, sets, why, current_backend(), preset=preset, **base):
            L.append(entry, ledger)
        print(f"SKIP(RAM): {model} {why}; recorded in {ledger}")
        return

    err = ui.console(stderr=True)
    with cli_args.one_line_errors(model):  # bad input, or MLX unable to run the model here
        group, load = cli_args.model_loader()  # under mlx.launch: split over the group
        with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task(f"loading {model}", total=None)
            m, tok, source = load(model, progress=lambda i, n: progress.update(task, completed=i, total=n))
            variants = E.variants(model, source.family, sets, current_backend(), preset)
            judged = accuracy_by_default(model) if accuracy is None else accuracy
            # steps: warm-ups, runs, issue times, kernel counts, accuracy; n: with the control
            n = len(variants) + 1
            total = n * (runs + 1 + issue_time) + (n if count_kernels else 0) + (n - 1 if judged else 0)
            progress.update(task, description="measuring", completed=0, total=total)
            written: list[dict[str, Any]] = []

            def keep(control, patched):  # each set's line as soon as it is final (a later set's
                # accuracy run may outlast a time limit: what is measured is not lost with it)
                entry = E.measured(source, control, patched, **base)
                if group is not None:  # every rank measured the split model; rank 0 alone writes
                    if group.rank() != 0:
                        return
                    entry["world_size"] = group.size()
                L.append(entry, ledger)
                written.append(entry)

            measure(
                m,
                tok,
                [CONTROL, *variants],
                runs=runs,
                max_tokens=max_tokens,
                prompt_tokens=prompt_tokens,
                count_kernels=count_kernels,
                issue_time=issue_time,
                prefill_once=prefill_once,
                accuracy=judged,
                on_step=ui.step_reporter(progress, task, err),
                on_done=keep,
            )

    if group is not None and group.rank() != 0:
        return
    ui.console().print(_history_table(written, f"appended to {ledger}"))


def _history_table(entries: list[dict[str, Any]], title: str, superseded: dict | None = None):
    from rich.table import Table

    superseded = superseded or {}
    host = any(e.get("issue_ms_per_step") is not None for e in entries)  # none before schema 4
    t = Table(title=title)
    for col in (
        "line",
        "when",
        "model",
        "patterns",
        "device",
        "prompt",
        "fidelity",
        "stock tok/s",
        "patched tok/s",
        "speedup",
        "kernels/tok",
        *(["host ms/step"] if host else []),
        "commit",
        "notes",
    ):
        t.add_column(
            col,
            justify="right" if "tok/" in col or col in ("speedup", "prompt", "host ms/step") else "left",
            overflow="fold",
        )
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
            lid,
            e["timestamp"][:16],
            f"{e['model']} ({e.get('quantization') or '?'})".replace("synth:", ""),
            ",".join(e["patterns"]) or "none (stock vs stock)",
            S.device_label(e),
            S.fmt(e.get("prompt_tokens"), "d") if e.get("prompt_tokens") else "?",
            fid,
            S.fmt(e.get("stock_decode_tps_median")),
            S.fmt(e.get("decode_tps_median")),
            S.fmt(e.get("speedup"), ".3f"),
            f"{S.fmt(stock_k, '.0f')} -> {S.fmt(kernels, '.0f')}" if kernels is not None else "-",
            *([S.host_ms(e)] if host else []),
            S.commit_label(e),
            notes,
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
        print(
            json.dumps(
                [
                    {**e, "line": L.line_id(e), "superseded": data.superseded.get(L.line_id(e))}
                    for e in entries
                ],
                indent=2,
            )
        )
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
        current = [e for e in current if device.lower() in S.device_label(e).lower()]
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
        t = Table(title=S.title(model, quant, dev, group))
        columns = S.columns(group)
        for col in columns:
            t.add_column(
                col,
                justify="left"
                if col in ("line", "patterns", "fidelity", "noise floor", "commit")
                else "right",
                no_wrap=col in ("line", "noise floor", "commit", "speedup"),
                overflow="fold",
            )
        for r in group:
            c = S.cells(r)
            c["patterns"] = c["patterns"].replace(",", ", ")  # room to wrap between names
            t.add_row(*(c[col] for col in columns))
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
        done = L.supersede(ledger, ids, reason, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    except L.LedgerError as e:
        _fail(str(e))
    print(f"marked {len(done)} line(s) superseded in {ledger}: {', '.join(done)}")


def main():
    app()
