"""The `zmlx` command (also `python -m zmlx`): one subcommand per `python -m zmlx.<module>`
entry point, and --version."""

from __future__ import annotations

from typing import Annotated

import typer

from zmlx import synth_cli, ui, validate
from zmlx.bench import drift
from zmlx.bench import report as bench_report
from zmlx.matrix import cli as matrix_cli

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="zmlx: fused kernels for mlx-lm models, with token-fidelity proof.",
)
app.command("validate")(validate.command)
app.command("drift")(drift.main)
app.command("synth")(synth_cli.command)
app.command("report")(bench_report.command)
app.add_typer(matrix_cli.app, name="matrix")


def version_line() -> str:
    """'zmlx 0.1.0 (mlx 0.32.4, mlx-lm 0.32.2)': what a bug report needs first."""
    from importlib.metadata import PackageNotFoundError, version

    from zmlx import __version__

    def installed(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"zmlx {__version__} (mlx {installed('mlx')}, mlx-lm {installed('mlx-lm')})"


def _print_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="print the zmlx, mlx and mlx-lm versions and exit",
        ),
    ] = False,
):
    """zmlx: fused kernels for mlx-lm models, with token-fidelity proof."""


@app.command("patterns")
def patterns_command():
    """List the patterns: what each fuses, fidelity class, flag, families and preset."""
    from rich.table import Table

    from zmlx.config import flag_name
    from zmlx.families import FAMILIES
    from zmlx.patch import PATTERNS

    t = Table(title="zmlx patterns")
    for col in ("pattern", "fuses", "fidelity", "flag", "default in"):
        t.add_column(col)
    for name, p in PATTERNS.items():
        default = (
            ", ".join(
                _preset_cell(f, fam, name)
                for f, fam in FAMILIES.items()
                if name in fam.preset or any(name in p for p in fam.presets_on.values())
            )
            or "-"
        )
        exact_on = [b for b in ("cuda", "metal") if all(k.fidelity_on(b) == "exact" for k in p.kernels)]
        fidelity = p.fidelity
        if fidelity != "exact" and exact_on:
            fidelity += f" (exact on {', '.join(exact_on)})"
        t.add_row(name, p.summary, fidelity, flag_name(name), default)
    ui.console().print(t)


def _preset_cell(family: str, fam, name: str) -> str:
    """'glm4_moe_lite' when in the preset everywhere, else 'glm4_moe_lite (cuda)'."""
    from zmlx.backend import BACKENDS

    on = [b for b in BACKENDS if name in fam.preset_on(b)]
    return family if len(on) == len(BACKENDS) else f"{family} ({', '.join(on)})"


def main():
    app()


if __name__ == "__main__":
    main()
