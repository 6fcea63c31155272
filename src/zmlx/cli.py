"""The `zmlx` command: one subcommand per `python -m zmlx.<module>` entry point."""

from __future__ import annotations

import typer

from zmlx import synth, ui, validate
from zmlx.bench import report as bench_report
from zmlx.matrix import cli as matrix_cli

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="zmlx: fused kernels for mlx-lm models, with token-fidelity proof.")
app.command("validate")(validate.command)
app.command("synth")(synth.command)
app.command("report")(bench_report.command)
app.add_typer(matrix_cli.app, name="matrix")


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
        default = ", ".join(f for f, fam in FAMILIES.items() if name in fam.preset) or "-"
        t.add_row(name, p.summary, p.fidelity, flag_name(name), default)
    ui.console().print(t)


def main():
    app()


if __name__ == "__main__":
    main()
