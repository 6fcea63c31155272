#!/usr/bin/env python3
"""mlx-lm's own model tests, stock and with every model patched first: do they end alike?

    python benchmarks/mlx_lm_model_tests.py [--patterns default] [--patterns all] [--file test_models.py]

Gets the installed mlx-lm's sdist from the package index (cached under ~/.cache/zmlx), runs
its test file stock, then once per selection with every model of a family zmlx knows
patched right after it is built ("default": each family's preset; "all": every pattern;
else a selection), and prints each run's counts, the models patched and every test whose
outcome differs from stock. Exit status 0 when every run ended as stock did, 1 otherwise.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Annotated

import typer

from zmlx import ui
from zmlx.bench import mlx_lm_tests


def main(
    patterns: Annotated[
        list[str] | None, typer.Option(help="selections to run patched (repeatable): default, all, or a list")
    ] = None,
    file: Annotated[str, typer.Option(help="mlx-lm's test file")] = "test_models.py",
):
    from rich.table import Table

    from zmlx.cli import args as cli_args
    from zmlx.config import ConfigError
    from zmlx.patch.patterns import PATTERNS

    selections = patterns or ["default", "all"]
    with cli_args.one_line_errors():
        for sel in selections:
            if sel not in ("default", "all"):
                cli_args.selection(sel, "--patterns")
        try:
            tests = mlx_lm_tests.fetch()
        except mlx_lm_tests.FetchError as e:
            raise ConfigError(str(e)) from None
        path = tests / file
        if not path.is_file():
            raise ConfigError(f"mlx-lm's sdist has no tests/{file}")
    console = ui.console()
    console.print(f"mlx-lm tests: {path}")
    stock = mlx_lm_tests.run(path)
    table = Table(title=f"{file}: stock vs patched first")
    for col in ("run", "passed", "failed", "error", "skipped", "models patched (type: patterns)"):
        table.add_column(col)

    def row(name: str, r: mlx_lm_tests.Run) -> None:
        c = r.counts()
        kinds = Counter(f"{p['model_type']}: {','.join(p['applied']) or '-'}" for p in r.patched)
        patched = "; ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "-"
        table.add_row(name, *(str(c.get(k, 0)) for k in ("passed", "failed", "error", "skipped")), patched)

    row("stock", stock)
    differ = 0
    diffs: list[tuple[str, list[str]]] = []
    for sel in selections:
        chosen = ",".join(PATTERNS) if sel == "all" else sel
        r = mlx_lm_tests.run(path, chosen)
        row(f"patched: {sel}", r)
        lines = mlx_lm_tests.compare(stock, r)
        differ += bool(lines)
        diffs.append((sel, lines))
    console.print(table)
    for sel, lines in diffs:
        console.print(f"{sel}: " + ("every test ended as stock" if not lines else f"{len(lines)} differ"))
        for line in lines:
            console.print(f"  {line}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    ui.run_command(main)
