"""`zmlx generate | chat | server`: mlx-lm's own commands, the model patched after loading.

Every argument but zmlx's (--patterns, --exclude, --preset, --no-patch) reaches mlx-lm's
argument parser untouched, so these commands take no typer options: click is told to pass
unknown options through and to leave --help to mlx-lm (zmlx.mlx_lm_tools appends zmlx's).
"""

from __future__ import annotations

import typer

from zmlx.cli.args import environment, one_line_errors

# click passes every argument through (ctx.args) and leaves -h/--help to mlx-lm
CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}

HELP = {
    "generate": "mlx-lm's generate (mlx_lm generate), the model patched; its flags plus zmlx's "
    "--patterns, --exclude, --preset default|fast, --no-patch (see --help)",
    "chat": "mlx-lm's chat (mlx_lm chat), the model patched; its flags plus zmlx's (see --help)",
    "server": "mlx-lm's OpenAI-compatible server (mlx_lm server), the model patched; its flags plus "
    "zmlx's (see --help)",
}


def run_tool(tool: str, argv: list[str]) -> None:
    """Run mlx-lm's `tool` with `argv`: bad zmlx options or environment -> one line, exit 2."""
    from zmlx import mlx_lm_tools

    with one_line_errors():
        config = environment()
        mlx_lm_tools.run(tool, argv, config=config)


def command_for(tool: str):
    def command(ctx: typer.Context) -> None:
        run_tool(tool, list(ctx.args))

    command.__doc__ = HELP[tool]
    return command


def register(app: typer.Typer) -> None:
    """Add the generate, chat and server commands to the `zmlx` app."""
    for tool in HELP:
        app.command(tool, context_settings=CONTEXT, add_help_option=False, help=HELP[tool])(command_for(tool))
