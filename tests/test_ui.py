"""The harness's step reporter: a log (no terminal) gets one timed line per finished step."""

import io

from rich.console import Console

from zmlx import ui


class _Progress:
    def __init__(self):
        self.advanced = 0

    def advance(self, task):
        self.advanced += 1


def _reporter(terminal: bool):
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200)
    ticks = iter([10.0, 12.5, 20.25])
    progress = _Progress()
    return ui.step_reporter(progress, 0, console, clock=lambda: next(ticks)), progress, out


def test_a_log_gets_each_step_with_the_seconds_since_the_start():
    on_step, progress, out = _reporter(terminal=False)
    on_step("run 1/5 control: 51.2 tok/s decode")
    on_step("kernels patched_0: 1178 per token")
    assert progress.advanced == 2
    assert out.getvalue().splitlines() == [
        "[    2.5 s] run 1/5 control: 51.2 tok/s decode",
        "[   10.2 s] kernels patched_0: 1178 per token",
    ]


def test_a_terminal_gets_only_the_progress_bar():
    on_step, progress, out = _reporter(terminal=True)
    on_step("run 1/5 control: 51.2 tok/s decode")
    assert progress.advanced == 1
    assert out.getvalue() == ""
