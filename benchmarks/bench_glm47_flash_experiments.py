#!/usr/bin/env python3
"""GLM-4.7-Flash experiments: named variants, interleaved in one process, into a capsule.

    python benchmarks/bench_glm47_flash_experiments.py --variants control control_repeat \
        router_combine --runs 3 --max-tokens 200 --json-out results.json

`control` (stock) always runs first and is the baseline. A variant marked unsafe is
skipped, and recorded as skipped, unless --allow-unsafe. The capsule goes under
--capsule-dir (repro_capsules/ by default); `python -m zmlx.bench.report` prints it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from zmlx import ui
from zmlx.bench import capsule, stamp
from zmlx.bench.harness import measure
from zmlx.bench.variants import GLM47_FLASH
from zmlx.cli.report import single_table
from zmlx.models import ModelLoadError, load

DEFAULT_MODEL = "synth:glm4_moe_lite/flash/affine4"


def main(
    variants: Annotated[Optional[list[str]], typer.Option(help="variants to run (repeat the option)")] = None,
    model: Annotated[str, typer.Option(help="checkpoint, Hub id or synth: spec")] = DEFAULT_MODEL,
    runs: Annotated[int, typer.Option(help="timed runs per variant")] = 3,
    max_tokens: Annotated[int, typer.Option(help="tokens generated per run")] = 200,
    prompt_tokens: Annotated[int, typer.Option(help="prompt length in tokens")] = 32,
    json_out: Annotated[Optional[Path], typer.Option(help="also write the capsule here")] = None,
    capsule_dir: Annotated[Path, typer.Option(help="where the capsule is written")] = Path("repro_capsules"),
    allow_unsafe: Annotated[bool, typer.Option(help="run variants marked unsafe")] = False,
    count_kernels: Annotated[bool, typer.Option(help="count CUDA kernels per token")] = True,
    name: Annotated[str, typer.Option(help="experiment name in the capsule")] = "glm47_flash_experiments",
):
    from rich.console import Console
    from rich.progress import Progress

    names = list(variants or GLM47_FLASH)
    unknown = [n for n in names if n not in GLM47_FLASH]
    if unknown:
        print(
            f"error: unknown variant(s): {', '.join(unknown)}; valid: {', '.join(GLM47_FLASH)}",
            file=sys.stderr,
        )
        raise typer.Exit(2)
    if runs < 1 or max_tokens < 1 or prompt_tokens < 1:
        print("error: --runs, --max-tokens and --prompt-tokens must be at least 1", file=sys.stderr)
        raise typer.Exit(2)
    try:
        git = stamp.git()
    except stamp.GitStateError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    chosen = [GLM47_FLASH["control"]] + [GLM47_FLASH[n] for n in names if n != "control"]
    err = Console(stderr=True)
    try:
        with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task(f"loading {model}", total=None)
            m, tok, source = load(model, progress=lambda i, n: progress.update(task, completed=i, total=n))
            progress.update(
                task,
                description="measuring",
                completed=0,
                total=len(chosen) * (runs + 1) + (len(chosen) if count_kernels else 0),
            )
            results = measure(
                m,
                tok,
                chosen,
                runs=runs,
                max_tokens=max_tokens,
                prompt_tokens=prompt_tokens,
                allow_unsafe=allow_unsafe,
                count_kernels=count_kernels,
                on_step=ui.step_reporter(progress, task, err),
            )
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2)
    cap = capsule.build(
        name=name,
        model={
            "name": source.name,
            "kind": source.kind,
            "family": source.family,
            "quantization": source.quantization,
        },
        params={
            "runs": runs,
            "max_tokens": max_tokens,
            "prompt_tokens": prompt_tokens,
            "allow_unsafe": allow_unsafe,
            "variants": [v.name for v in chosen],
        },
        variants=[r.to_dict() for r in results],
        git=git,
    )
    path = capsule.write(cap, capsule_dir)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(cap, indent=2) + "\n")
    ui.console().print(single_table(cap, path.name))
    print(f"capsule: {path}")


if __name__ == "__main__":
    ui.run_command(main)
