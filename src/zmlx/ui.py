"""Consoles for tables: at least 160 columns when the output is not a terminal (logs, CI)."""

from __future__ import annotations


def console(stderr: bool = False):
    from rich.console import Console

    c = Console(stderr=stderr)
    if not c.is_terminal:
        c = Console(stderr=stderr, width=max(c.width, 160))
    return c


def run_command(fn) -> None:
    """Run one typer command function as a program (`python -m zmlx.<module>`)."""
    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(fn)
    app()
