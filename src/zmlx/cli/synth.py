"""`python -m zmlx.synth` / `zmlx synth`: write a synthetic checkpoint from the command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from zmlx import ui


def command(
    family: Annotated[str, typer.Argument(help="model family (mlx-lm model_type)")] = "glm4_moe_lite",
    out: Annotated[Path, typer.Option(help="checkpoint directory to write")] = Path("glm47-synth"),
    preset: Annotated[
        str,
        typer.Option(help="tiny (CPU tests), a real size (glm4_moe_lite: flash) or layer-faithful (layers4)"),
    ] = "tiny",
    quant: Annotated[str, typer.Option(help="affine4, affine8, mxfp4 or bf16 (Hub layout)")] = "affine4",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="replace OUT if zmlx wrote it (it holds zmlx-synth.json); nothing else")
    ] = False,
):
    """Write a synthetic checkpoint that mlx_lm.load reads unchanged."""
    from rich.console import Console
    from rich.progress import Progress

    from zmlx import synth

    err = Console(stderr=True)
    try:
        spec = synth.SynthSpec(family, preset, quant, seed)
        with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task(f"writing {spec.name}", total=None)
            synth.write(
                spec,
                out,
                overwrite=overwrite,
                progress=lambda i, n: progress.update(task, completed=i, total=n),
            )
    except synth.SynthError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2)
    size = sum(f.stat().st_size for f in out.iterdir())
    shown = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    print(f"wrote {spec.name} to {out} ({shown})")


def main() -> None:
    ui.run_command(command)
