"""Consoles for tables: at least 160 columns when the output is not a terminal (logs, CI)."""

from __future__ import annotations


def console(stderr: bool = False):
    from rich.console import Console

    c = Console(stderr=stderr)
    if not c.is_terminal:
        c = Console(stderr=stderr, width=max(c.width, 160))
    return c
