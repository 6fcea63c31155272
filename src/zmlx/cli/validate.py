"""`zmlx validate` / `python -m zmlx.validate`: token fidelity and throughput of a patched
model against stock mlx-lm (the check itself is zmlx.fidelity.validate).

    python -m zmlx.validate MODEL [--patterns a,b] [--exclude c] [--max-tokens 200]
                                  [--runs 3] [--prompt TEXT] [--accuracy/--no-accuracy] [--json]

Exit status: 0 PASS (identical tokens) or ACCURATE (tokens differ, the accuracy rule of
zmlx.accuracy holds), 1 FAIL, 2 bad input or nothing to validate (no module of the
model was patched: an unsupported family, `--patterns none`, everything excluded).
The accuracy check needs memory for a float32 reference copy of the model: by default it
runs when twice the model's estimated size fits the memory budget (or the size is unknown).
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from zmlx import ui
from zmlx.accuracy import Accuracy
from zmlx.cli import args as cli_args
from zmlx.fidelity import DEFAULT_PROMPT, Report, validate
from zmlx.patch import PatchResult, PatternReport


def render(report: Report, console) -> None:
    from dataclasses import fields

    from rich.table import Table

    names = {f.name for f in fields(PatchResult)}
    pr = {k: v for k, v in report.patch.items() if k in names}  # to_dict adds derived keys
    pr["patterns"] = {k: PatternReport(**v) for k, v in pr["patterns"].items()}
    console.print(PatchResult(**pr).table())

    label = f" [{report.model_label}]" if report.model_label else ""
    t = Table(title=f"zmlx.validate: {report.model} ({report.quantization}) on {report.device}{label}")
    t.add_column("")
    t.add_column("stock", justify="right")
    t.add_column("patched", justify="right")
    t.add_column("patched / stock", justify="right")
    for label, key, fmt in (
        ("decode tok/s (median)", "decode_tps", "{:.1f}"),
        ("prefill tok/s (median)", "prompt_tps", "{:.1f}"),
        ("peak memory GB", "peak_memory_gb", "{:.3f}"),
    ):
        s, p = report.median("stock", key), report.median("patched", key)
        t.add_row(label, fmt.format(s), fmt.format(p), f"{p / s:.3f}x" if s else "-")
    console.print(t)

    f = Table(title=f"fidelity over {report.runs} run(s), {report.max_tokens} max tokens")
    f.add_column("check")
    f.add_column("result", justify="right")
    f.add_row("identical tokens", f"{report.identical}/{report.total}")
    d = report.first_divergence
    f.add_row(
        "first divergence",
        "none"
        if d is None
        else f"run {d.run + 1}, position {d.position}: stock {d.stock_token} vs patched {d.patched_token}",
    )
    f.add_row("teacher-forced top-1 agreement", f"{report.teacher_forced_top1:.4f}")
    f.add_row("max |Δlogit|", f"{report.max_abs_dlogit:.4g}")
    f.add_row("logit correlation", f"{report.logit_correlation:.6f}")
    if not report.stock_deterministic:
        f.add_row("note", "stock runs differ from each other: the backend is not deterministic")
    if report.accuracy is not None:
        console.print(f)
        f = accuracy_table(report.accuracy)
        for reason in report.accuracy.reasons:
            f.add_row("not accurate", reason, "", "", "", "")
    color = {"PASS": "green", "ACCURATE": "yellow"}.get(report.verdict, "red")
    f.add_row("verdict", f"[bold {color}]{report.verdict}[/]", *([""] * (len(f.columns) - 2)))
    console.print(f)


def accuracy_table(acc: Accuracy):
    """llama.cpp's --kl-divergence summary, one row per comparison (KLD in nats per position)."""
    from rich.table import Table

    t = Table(
        title="accuracy against the float32 reference (teacher-forced on stock's tokens and a fixed text)"
    )
    for name in ("", "mean KLD ± err", "p99 KLD", "max KLD", "same top %", "mean |Δp|"):
        t.add_column(name, justify="left" if not name else "right")
    for label, d in acc.rows():
        t.add_row(
            label,
            f"{d.kld_mean:.3e} ± {d.kld_sem:.1e}",
            f"{d.kld_p99:.3e}",
            f"{d.kld_max:.3e}",
            f"{d.same_top:.2f}",
            f"{d.mean_abs_dp:.3e}",
        )
    if acc.excess is not None:  # paired by position: beyond the positions' noise or not
        e = acc.excess
        t.add_row("patched - stock", f"{e.mean:+.3e} ± {e.sem:.1e}", "", "", "", "")
    r = acc.rule
    t.add_row(
        "rule",
        f"ref‖patched ≤ {r.kld_ratio} x ref‖stock + {r.kld_slack:g}",
        "likewise",
        "",
        f"≥ stock - {r.top1_points}",
        "",
    )
    t.add_row("accurate", "yes" if acc.accurate else "no", "", "", "", "")
    return t


def accuracy_by_default(model: str) -> bool:
    """On when the model and its float32 reference fit the memory budget, or its size is unknown."""
    from zmlx.matrix import memory

    need = memory.estimate_model_bytes(model)
    budget, _ = memory.memory_budget(None)
    return need is None or budget is None or 2 * need <= memory.HEADROOM * budget


def main_command(
    model: str,
    patterns: str | None = None,
    exclude: str | None = None,
    max_tokens: int = 200,
    runs: int = 3,
    prompt: str = DEFAULT_PROMPT,
    as_json: bool = False,
    accuracy: bool | None = None,
    preset: str | None = None,
) -> int:
    """Everything `zmlx validate` does; returns the exit status of a finished
    check (0 PASS or ACCURATE, 1 FAIL); bad input raises typer.Exit(2) after its one-line
    message. `accuracy` None: on when the model's reference fits (accuracy_by_default)."""
    from rich.progress import Progress

    from zmlx import distributed

    err = ui.console(stderr=True)
    with cli_args.one_line_errors(model):
        # Everything that can be checked is checked before spending time loading the model.
        cli_args.at_least(1, {"--max-tokens": max_tokens, "--runs": runs})
        pats, excl = cli_args.selection(patterns, "--patterns"), cli_args.selection(exclude, "--exclude")
        chosen = cli_args.preset_option(preset)
        cli_args.environment()
        cli_args.check_model_name(model)
        if accuracy is None:
            accuracy = accuracy_by_default(model)
        group, load = cli_args.model_loader()  # under mlx.launch: split over the group; rank 0 reports
        with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("loading model", total=None)
            m, tok, source = load(model, progress=lambda i, n: progress.update(task, completed=i, total=n))
            progress.update(task, description="validating", completed=0, total=2 * runs + 4 + accuracy)
            report = validate(
                m,
                tok,
                model_name=source.name,
                quantization=source.quantization,
                patterns=pats,
                exclude=excl,
                max_tokens=max_tokens,
                runs=runs,
                prompt=prompt,
                on_step=ui.step_reporter(progress, task, err),
                accuracy=accuracy,
                preset=chosen,
            )
            report.model_label = source.label
    if not distributed.primary(group):
        return 0 if report.ok else 1
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report, ui.console())
    return 0 if report.ok else 1


def command(
    model: cli_args.ModelArg,
    patterns: cli_args.PatternsOpt = None,
    exclude: Annotated[Optional[str], typer.Option(help="comma-separated patterns to leave out")] = None,
    preset: Annotated[Optional[str], typer.Option(help=cli_args.PRESET_HELP)] = None,
    max_tokens: Annotated[int, typer.Option(help="tokens to generate per run")] = 200,
    runs: Annotated[int, typer.Option(help="stock/patched run pairs")] = 3,
    prompt: Annotated[str, typer.Option(help="prompt text")] = DEFAULT_PROMPT,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    accuracy: Annotated[
        Optional[bool],
        typer.Option(
            "--accuracy/--no-accuracy",
            help="judge by the accuracy rule against a float32 reference copy of the model "
            "(default: on when twice the model's size fits in memory)",
            show_default=False,
        ),
    ] = None,
):
    """Token fidelity and decode/prefill throughput of the patched model vs stock mlx-lm."""
    raise typer.Exit(
        main_command(model, patterns, exclude, max_tokens, runs, prompt, json_output, accuracy, preset)
    )


def main() -> None:
    ui.run_command(command)
