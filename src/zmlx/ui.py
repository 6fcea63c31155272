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


def step_reporter(progress, task, console, clock=None):
    """An `on_step` callback for the harness: advances the progress bar and, when the output
    is not a terminal (a log on the GPU machine, CI), where the bar is hidden, prints each
    finished step on its own line with the seconds since the start, so that a run cut off
    by a time limit still says how far it got and where the time went."""
    import time

    now = clock or time.monotonic
    start = now()

    def on_step(label: str) -> None:
        progress.advance(task)
        if not console.is_terminal:
            console.print(f"[{now() - start:7.1f} s] {label}", highlight=False, soft_wrap=True)
            console.file.flush()

    return on_step
