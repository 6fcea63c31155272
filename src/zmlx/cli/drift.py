"""`zmlx drift` / `python -m zmlx.bench.drift`: where a patched model's numbers leave
stock's, layer by layer (the measurement is zmlx.bench.drift, which says what each
figure means).

    python -m zmlx.bench.drift MODEL --patterns P[,Q] [--steps 8]
"""

from __future__ import annotations

import json
import statistics
from typing import Annotated, Optional

import typer

from zmlx import ui
from zmlx.bench.drift import Drift, drift
from zmlx.cli import args as cli_args
from zmlx.config import ConfigError


def table(result: Drift, title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in (
        "layer",
        "local rel. err (median / max)",
        "carried rel. err (median / max)",
        "experts differing",
    ):
        t.add_column(col, justify="right")
    for d in result.layers:
        routes = f"{sum(d.routes)} over {len(d.routes)} steps" if d.routes else "-"
        t.add_row(
            str(d.layer),
            f"{statistics.median(d.local):.2e} / {max(d.local):.2e}",
            f"{statistics.median(d.carried):.2e} / {max(d.carried):.2e}",
            routes,
        )
    agree = sum(s.argmax_equal for s in result.steps)
    t.caption = (
        f"argmax equal {agree}/{len(result.steps)}; max |Δlogit| per step "
        f"{', '.join(f'{s.max_abs_dlogit:.3g}' for s in result.steps)}; stock top-1 margin "
        f"{', '.join(f'{s.stock_margin:.3g}' for s in result.steps)}"
    )
    return t


def command(
    model: cli_args.ModelArg,
    patterns: cli_args.PatternsOpt = None,
    preset: Annotated[Optional[str], typer.Option(help=cli_args.PRESET_HELP)] = None,
    steps: Annotated[int, typer.Option(help="teacher-forced decode steps")] = 8,
    prompt_tokens: Annotated[int, typer.Option(help="prompt length (seeded random ids)")] = 32,
    perturb: Annotated[
        float,
        typer.Option(
            help="also multiply each MLP output of the patched copy by (1 + perturb * N(0,1)): "
            "how far rounding-sized errors carry in this model (2**-9 ~ one bf16 rounding)"
        ),
    ] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
):
    """Layer-by-layer drift of the patched model from stock (two copies in memory)."""
    from zmlx import backend
    from zmlx.bench.harness import make_prompt
    from zmlx.models import load
    from zmlx.patch import patch

    with cli_args.one_line_errors(model):
        cli_args.at_least(1, {"--steps": steps})
        cli_args.at_least(2, {"--prompt-tokens": prompt_tokens})
        cli_args.finite("--perturb", perturb, at_least=0)
        pats = cli_args.selection(patterns, "--patterns")
        chosen = cli_args.preset_option(preset)
        cli_args.environment()
        cli_args.check_model_name(model)
        stock, tok, source = load(model)
        patched, _, _ = load(model)
        result = patch(patched, patterns=pats, preset=chosen)
        for name in ("layers", "embed_tokens", "norm"):
            if not hasattr(stock.model, name):
                raise ConfigError(
                    f"{source.name}: no model.{name}; drift follows mlx-lm's decoder-layer models"
                )
        specials = tuple(getattr(tok, "all_special_ids", ()))
        prompt = make_prompt(stock.args.vocab_size, prompt_tokens, avoid=specials)
        res = drift(stock, patched, prompt, steps=steps, perturb=perturb)
    if as_json:
        print(
            json.dumps(
                {
                    "model": source.name,
                    "backend": backend.device_name(),
                    "patterns": {n: r.runs_on for n, r in result.patterns.items() if r.patched},
                    **res.to_dict(),
                },
                indent=2,
            )
        )
        return
    con = ui.console()
    applied = ", ".join(f"{n} ({r.runs_on})" for n, r in result.patterns.items() if r.patched) or "nothing"
    con.print(table(res, f"drift of {source.name} patched with {applied} on {backend.device_name()}"))


def main() -> None:
    ui.run_command(command)
