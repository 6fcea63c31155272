#!/usr/bin/env python3
"""The quantized MLA latent cache at long context: KL table, cache bytes and decode time.

    MLX_ENABLE_TF32=0 python benchmarks/kv_quant_accuracy.py [MODEL] --contexts 4096,32768 \\
        --bits 4,8 --group-size 64 --tokens 64 [--seed N]

Per context length, the patched model's bf16 cache against mlx-lm's `kv_bits` quantized
copies of it: KL divergence to the float32 reference (the accuracy rule, with the bf16 cache
as the yardstick, and the paired per-position excess over the bf16 cache with its standard
error), bytes held, synchronous decode ms per step (alternated) and, on CUDA, the GPU's ms
per step (kernel timestamps, free of the host's noise). MODEL is a checkpoint directory or
a synth: spec (default: the full-size GLM-4.7-Flash, affine4).
Writes a capsule under --capsule-dir; zmlx.bench.kv_quant says what each figure means.
On CUDA the float32 reference needs MLX_ENABLE_TF32=0 (else it would run on the CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zmlx import backend, config, ui
from zmlx.bench import capsule, kv_quant, stamp
from zmlx.bench.harness import make_prompt
from zmlx.cli import args as cli_args

COLUMNS = [
    "context",
    "cache",
    "bytes vs bf16",
    "KLD mean",
    "KLD p99",
    "same top",
    "KLD - bf16's",
    "rule",
    "ms/step",
    "GPU ms/step",
]


def _ints(text: str, option: str) -> list[int]:
    from zmlx.config import ConfigError

    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise ConfigError(f"{option} takes integers >= 2, got {text!r}")
    return values


def main(
    model: Annotated[str, typer.Argument(help="checkpoint directory or synth: spec")] = (
        "synth:glm4_moe_lite/flash/affine4"
    ),
    contexts: Annotated[str, typer.Option(help="prompt lengths, comma-separated")] = "4096,32768",
    bits: Annotated[str, typer.Option(help="cache bit widths, comma-separated (4, 8)")] = "4,8",
    group_size: Annotated[int, typer.Option(help="quantization group (32, 64)")] = 64,
    tokens: Annotated[int, typer.Option(help="decode steps judged per context")] = 64,
    chunk: Annotated[int, typer.Option(help="prefill chunk (mlx-lm's prefill_step_size)")] = 2048,
    timing_steps: Annotated[int, typer.Option(help="decode steps per timed block")] = 16,
    repeats: Annotated[int, typer.Option(help="timed blocks per cache (alternated)")] = 5,
    patterns: Annotated[str, typer.Option(help="patterns on every side")] = "mla_kv_quant",
    seed: Annotated[int, typer.Option(help="the prompt's seed (another sample of positions)")] = 0,
    capsule_dir: Annotated[Path, typer.Option(help="where the capsule is written")] = Path("repro_capsules"),
):
    from rich.console import Console
    from rich.progress import Progress

    import zmlx
    from zmlx import latent_quant
    from zmlx.config import ConfigError
    from zmlx.models import load

    err = Console(stderr=True)
    with cli_args.one_line_errors(model):
        lengths = _ints(contexts, "--contexts")
        widths = _ints(bits, "--bits")
        selected = cli_args.selection(patterns, "--patterns")
        if not selected or "mla_kv_quant" not in selected:
            raise ConfigError("--patterns must include mla_kv_quant (it reads the quantized cache)")
        cli_args.at_least(1, {"--tokens": tokens, "--chunk": chunk, "--timing-steps": timing_steps})
        cli_args.at_least(1, {"--repeats": repeats})
        cli_args.at_least(0, {"--seed": seed})
        for b in widths:
            why = latent_quant.kv_quant_error(b, group_size)
            if why:
                raise ConfigError(why)
        if backend.current() == "cuda" and config.tf32_enabled():
            raise ConfigError("set MLX_ENABLE_TF32=0: with TF32 the float32 reference runs on the CPU")
        try:
            git = stamp.git()
        except stamp.GitStateError as e:
            raise ConfigError(str(e)) from None
        m, tok, _source = load(model)
        zmlx.patch(m, patterns=list(selected))
        vocab = m.args.vocab_size if hasattr(m, "args") else len(tok._tokenizer)
        results: dict[int, list[kv_quant.Side]] = {}
        with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("kv cache", total=len(lengths))
            for n in lengths:
                prompt = mx_prompt(vocab, n, tok, seed)
                results[n] = kv_quant.measure(
                    m,
                    prompt,
                    bits=widths,
                    group_size=group_size,
                    tokens=tokens,
                    chunk=chunk,
                    timing_steps=timing_steps,
                    repeats=repeats,
                    progress=lambda what: progress.update(task, description=what),
                )
                progress.advance(task)
    cap = capsule.build(
        name="kv_quant_accuracy",
        model={"name": model, "kind": "model", "patterns": list(selected)},
        params={
            "contexts": lengths,
            "bits": widths,
            "group_size": group_size,
            "tokens": tokens,
            "chunk": chunk,
            "timing_steps": timing_steps,
            "repeats": repeats,
            "seed": seed,
            "backend": backend.current(),
        },
        variants=[{"context": n, **s.to_dict()} for n, sides in results.items() for s in sides],
        git=git,
    )
    path = capsule.write(cap, capsule_dir)
    from rich.table import Table

    table = Table(title=f"{path.name} on {cap['device']['name']}")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "cache" else "right")
    for row in kv_quant.table_rows(results):
        table.add_row(*row)
    ui.console().print(table)
    print(f"capsule: {path}")


def mx_prompt(vocab: int, n: int, tokenizer, seed: int = 0):
    import mlx.core as mx

    eos = sorted(getattr(tokenizer, "eos_token_ids", ()) or ())
    return mx.array(make_prompt(vocab, n, seed, avoid=eos))


if __name__ == "__main__":
    ui.run_command(main)
