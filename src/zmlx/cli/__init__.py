"""The `zmlx` command (also `python -m zmlx`): one subcommand per `python -m zmlx.<module>`
entry point, and --version.

Every command of zmlx lives in this package, one module each: argument handling and
rendering only; what they run is the library (zmlx.fidelity, zmlx.bench, zmlx.matrix,
zmlx.synth). The `python -m zmlx.<module>` entry points call in here.
"""

from __future__ import annotations

from typing import Annotated

import typer

from zmlx.cli import drift, matrix, patterns, report, synth, tools, validate

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="zmlx: fused kernels for mlx-lm models, with token-fidelity proof.",
)
app.command("validate")(validate.command)
app.command("drift")(drift.command)
app.command("synth")(synth.command)
app.command("report")(report.command)
app.command("patterns")(patterns.command)
app.add_typer(matrix.app, name="matrix")
tools.register(app)  # generate, chat, server: mlx-lm's commands, patched


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


def main():
    app()
