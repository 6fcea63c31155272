#!/usr/bin/env python3
"""Which part of compiled_decode makes its decode steps differ from mlx-lm's (diagnostic).

    python benchmarks/gpu/diagnose_compiled.py [SPEC] [--patterns a,b] [--steps N]

Teacher-forced on the eager run's greedy tokens, the logits of each decode step under
  A. mlx-lm's eager step over its KVCache, with the patterns;
  B. the same patterns + compiled_decode, its traced step run eagerly
     (`compiled_decode.uncompiled`: the static cache's whole buffers, device position and
     mask, MLX's eager kernels);
  C. the same, compiled (what compiled_decode runs).
A vs B isolates the static path, B vs C mx.compile's fusion. Prints one row per step
(bitwise equal, or the largest |difference| and whether the top token agrees) and a
summary line; on the CPU all three are bitwise equal (tests/bench/test_diagnose_compiled.py).
"""

from __future__ import annotations

import argparse

import mlx.core as mx

import zmlx
from zmlx import synth
from zmlx.cli import args as cli_args
from zmlx.fidelity import greedy_logits
from zmlx.patch.patterns import compiled_decode

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]


def _logits(model, prompt: mx.array, tokens: list[mx.array]) -> list[mx.array]:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    outs = [model(prompt, cache=cache)[:, -1]]
    for t in tokens:
        outs.append(model(t, cache=cache)[:, -1])
    mx.eval(outs)
    return [o.astype(mx.float32) for o in outs]


def _compare(a: mx.array, b: mx.array) -> str:
    if mx.array_equal(a, b).item():
        return "bitwise"
    same_top = mx.array_equal(mx.argmax(a, axis=-1), mx.argmax(b, axis=-1)).item()
    return f"{mx.abs(a - b).max().item():.3g} ({'same' if same_top else 'other'} top)"


def diagnose(model, patterns: str, steps: int) -> list[tuple[str, str]]:
    """Per decode step, (A vs B, B vs C) as `_compare` words them."""
    prompt = mx.array([PROMPT])
    zmlx.patch(model, patterns=patterns)
    try:
        greedy = greedy_logits(model, prompt, steps)  # its steps take the greedy tokens
        tokens = [mx.argmax(x[:, -1:], axis=-1) for x in greedy[:-1]]
        a = [x[:, -1].astype(mx.float32) for x in greedy]
    finally:
        zmlx.unpatch(model)
    with_compiled = f"{patterns},compiled_decode" if patterns and patterns != "none" else "compiled_decode"
    zmlx.patch(model, patterns=with_compiled)
    try:
        with compiled_decode.uncompiled(model):
            b = _logits(model, prompt, tokens)
        c = _logits(model, prompt, tokens)
    finally:
        zmlx.unpatch(model)
    return [(_compare(x, y), _compare(y, z)) for x, y, z in zip(a[1:], b[1:], c[1:])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="synth:glm4_moe_lite/tiny/bf16")
    parser.add_argument("--patterns", default="none", help="patterns beside compiled_decode")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    with cli_args.one_line_errors(args.spec):  # bad input: one `error:` line, exit 2
        cli_args.at_least(1, {"--steps": args.steps})
        cli_args.selection(args.patterns, "--patterns")
        model, _ = synth.build(args.spec)
        print(f"backend {zmlx.backend.current()}  model {args.spec}  patterns {args.patterns}")
        rows = diagnose(model, args.patterns, args.steps)
    print(f"{'step':>4}  {'eager vs static path (A/B)':<30}  {'static path vs compiled (B/C)':<30}")
    for i, (ab, bc) in enumerate(rows, 1):
        print(f"{i:>4}  {ab:<30}  {bc:<30}")
    ab_same = sum(r[0] == "bitwise" for r in rows)
    bc_same = sum(r[1] == "bitwise" for r in rows)
    print(f"bitwise steps: A/B {ab_same}/{len(rows)}, B/C {bc_same}/{len(rows)}")


if __name__ == "__main__":
    import sys

    import typer

    try:
        main()
    except typer.Exit as e:  # one_line_errors' exit, outside a typer app
        sys.exit(e.exit_code)
