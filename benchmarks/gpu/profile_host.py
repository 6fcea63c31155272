#!/usr/bin/env python3
"""Where a decode step's host time goes, per pattern set (diagnostic).

    python benchmarks/gpu/profile_host.py [SPEC] [--sets "none;a,b;a,b,c"] [--steps N]
        [--top N] [--no-profile] [--kernels] [--prompt-tokens N] [--kv-bits B] [--ab NAME ROUNDS]

For each set (`none` is stock), on one model, stock's set first:
  - build and issue milliseconds per greedy decode step (zmlx.bench.issue_time: the graph's
    Python, then MLX's encoding and launching of it in `mx.async_eval`), medians;
  - a pipelined decode as mlx-lm's generate_step runs it (the next step issued before the
    last token is read), milliseconds per token over `--steps` steps: the decode rate the
    host and GPU allow together;
  - unless --no-profile: cProfile of `--steps` build-only steps (model call + argmax), the
    `--top` functions by their own time and by cumulative time, so zmlx's Python per step
    is seen next to mlx-lm's.
  - with --kernels (CUDA): the step's kernels by name, per token (count and GPU µs, from
    PyTorch's profiler as the ledger's count is taken), so what stock work is left under a
    pattern set is seen by name.
MLX's own knobs (MLX_USE_CUDA_GRAPHS, MLX_MAX_OPS_PER_BUFFER, ...) are read by MLX once per
process: run the script once per setting; the ones set are printed at the top.
With --ab NAME ROUNDS: each set is timed 2 x ROUNDS times in this one process with one switch
at its two settings in alternating order, and the medians per setting printed last, on one
machine: `comments`, its kernels' device code handed to MLX compacted or as written
(ZMLX_KERNEL_COMMENTS=0/1, the kernels rebuilt for each); `tail`, mla_prologue's tail built
eagerly each step or compiled once (mla_prologue.COMPILE_TAIL); `moe_compiled`, moe_block's
gqa_prologue's and mla_prologue's prepared blocks called eagerly or through mx.compile (their
COMPILED); with --kernels, each
set's kernels a token at both settings after the rounds.
The decode steps follow a 10-token prompt, or `--prompt-tokens` seeded ids (the ledger's
prompt: zmlx.bench.harness.make_prompt, seed 0), for the costs that grow with the context;
with --kv-bits over a cache quantized after the prompt as mlx-lm's --kv-bits quantizes it
(an MLA model's sets need mla_kv_quant, which reads it).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import mlx.core as mx

import zmlx
from zmlx import latent_quant, synth
from zmlx.bench.issue_time import issue_times
from zmlx.cli import args as cli_args
from zmlx.config import ConfigError
from zmlx.prefill import prefill

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
MLX_KNOBS = (
    "MLX_USE_CUDA_GRAPHS",
    "MLX_MAX_OPS_PER_BUFFER",
    "MLX_MAX_MB_PER_BUFFER",
    "MLX_CUDA_GRAPH_CACHE_SIZE",
)


def pipelined_ms(model, prompt: mx.array, steps: int, warm: int = 3, kv_bits: int | None = None) -> float:
    """Milliseconds per token of a greedy decode pipelined as mlx-lm's generate_step is."""
    cache, logits = prefill(model, prompt, kv_bits=kv_bits)
    y = mx.argmax(logits[:, -1:], axis=-1)
    mx.async_eval(y)
    t0 = 0.0
    for i in range(warm + steps):
        if i == warm:
            t0 = time.perf_counter()
        nxt = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
        mx.async_eval(nxt)
        y.item()  # the previous token, read while the next step runs
        y = nxt
    y.item()
    return (time.perf_counter() - t0) * 1e3 / steps


def _warmed(model, prompt: mx.array, kv_bits: int | None = None):
    """(cache, last token) after the prompt and two decode steps (a trace, a kernel build)."""
    cache, logits = prefill(model, prompt, kv_bits=kv_bits)
    tok = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(tok)
    for _ in range(2):
        tok = mx.argmax(model(tok, cache=cache)[:, -1:], axis=-1)
        mx.eval(tok)
    return cache, tok


def build_profile(model, prompt: mx.array, steps: int, top: int, kv_bits: int | None = None) -> str:
    """cProfile's tables for `steps` decode steps' graph building (each step then evaluated
    outside the profiler)."""
    cache, tok = _warmed(model, prompt, kv_bits)
    prof = cProfile.Profile()
    for _ in range(steps):
        prof.enable()
        tok = mx.argmax(model(tok, cache=cache)[:, -1:], axis=-1)
        prof.disable()
        mx.eval(tok)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def histogram(events, steps: int) -> list[tuple[str, float, float]]:
    """(name, kernels per step, GPU µs per step) of profiler events that have `.name` and
    `.time_range.elapsed_us()`, the most frequent first (ties: the most GPU time first)."""
    count: dict[str, int] = {}
    us: dict[str, float] = {}
    for e in events:
        count[e.name] = count.get(e.name, 0) + 1
        us[e.name] = us.get(e.name, 0.0) + e.time_range.elapsed_us()
    rows = [(n, count[n] / steps, us[n] / steps) for n in count]
    return sorted(rows, key=lambda r: (-r[1], -r[2], r[0]))


def kernels_by_name(model, prompt: mx.array, steps: int = 4, kv_bits: int | None = None) -> str:
    """The table of `histogram` for `steps` greedy decode steps, or why there is none."""
    if zmlx.backend.current() != "cuda":
        return f"kernels by name need the CUDA backend (this is {zmlx.backend.current()})"
    import warnings

    from torch.profiler import ProfilerActivity, profile

    from zmlx.bench.harness import cuda_kernels

    cache, tok = _warmed(model, prompt, kv_bits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = profile(activities=[ProfilerActivity.CUDA])
    with prof:
        for _ in range(steps):
            tok = mx.argmax(model(tok, cache=cache)[:, -1:], axis=-1)
            mx.eval(tok)
    rows = histogram(cuda_kernels(prof), steps)
    lines = [f"{'per token':>9} {'GPU us':>9}  kernel"]
    lines += [f"{n:>9.1f} {u:>9.1f}  {name[:150]}" for name, n, u in rows]
    total_n, total_us = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines.append(f"{total_n:>9.1f} {total_us:>9.1f}  (all)")
    return "\n".join(lines)


def prompt_of(model, n: int | None) -> mx.array:
    """The decode steps' prompt: PROMPT, or n seeded ids (the ledger's make_prompt, seed 0)."""
    if n is None:
        return mx.array(PROMPT)
    from zmlx.bench.harness import make_prompt

    return mx.array(make_prompt(model.args.vocab_size, n, 0))


def run(
    model,
    sets: list[str],
    steps: int,
    top: int,
    profile: bool,
    kernels: bool = False,
    prompt_tokens: int | None = None,
    kv_bits: int | None = None,
) -> list[tuple[str, float, float, float]]:
    prompt = prompt_of(model, prompt_tokens)
    rows = []
    for s in sets:
        zmlx.unpatch(model)
        if s != "none":
            zmlx.patch(model, patterns=s)
        try:
            t = issue_times(model, prompt, steps=steps, warm=3, kv_bits=kv_bits)
            pipe = statistics.median(pipelined_ms(model, prompt, steps, kv_bits=kv_bits) for _ in range(3))
            rows.append((s, t.build_median, t.issue_median, pipe))
            print(
                f"[{s}] build {t.build_median:.2f} ms, issue {t.issue_median:.2f} ms, "
                f"pipelined {pipe:.2f} ms per token",
                flush=True,
            )
            if profile:
                print(build_profile(model, prompt, steps, top, kv_bits), flush=True)
            if kernels:
                print(kernels_by_name(model, prompt, kv_bits=kv_bits), flush=True)
        finally:
            zmlx.unpatch(model)
    return rows


def _comments(setting: str) -> None:
    from zmlx.kernels import core

    os.environ["ZMLX_KERNEL_COMMENTS"] = setting  # read by zmlx.config at each build
    core.build.cache_clear()


def _tail(setting: str) -> None:
    from zmlx.patch.patterns import mla_prologue

    mla_prologue.COMPILE_TAIL = setting == "1"
    mla_prologue._BLOCKS.clear()


def _moe_compiled(setting: str) -> None:
    from zmlx.patch.patterns import gqa_prologue, mla_prologue, moe_block

    for pattern in (moe_block, gqa_prologue, mla_prologue):
        pattern.COMPILED = setting == "1"
        pattern._BLOCKS.clear()


# --ab NAME: (what it switches, the names of its settings "0" and "1", how to apply one)
AB = {
    "comments": ("the kernels' device code handed to MLX", ("compacted", "written"), _comments),
    "tail": ("mla_prologue's tail (mla_q_prep_embed's steps)", ("eager", "compiled"), _tail),
    "moe_compiled": ("the blocks' launches (their COMPILED)", ("eager", "compiled"), _moe_compiled),
}


def ab(
    model,
    sets: list[str],
    steps: int,
    rounds: int,
    prompt_tokens: int | None,
    name: str,
    kernels: bool = False,
) -> None:
    """The --ab table: per set, build / issue / pipelined ms medians over `rounds` timings with
    the switch `name` at each setting, alternated; with `kernels`, each set's kernels a token
    at each setting after the rounds (CUDA). The switch is left at its default after."""
    from zmlx.kernels import core
    from zmlx.patch.patterns import gqa_prologue, mla_prologue, moe_block

    _, labels, apply = AB[name]
    tail_before, moe_before, gqa_before = mla_prologue.COMPILE_TAIL, moe_block.COMPILED, gqa_prologue.COMPILED
    mla_before = mla_prologue.COMPILED
    prompt = prompt_of(model, prompt_tokens)
    got: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    try:
        for r in range(rounds):
            for s in sets:
                for setting in ("0", "1") if r % 2 == 0 else ("1", "0"):
                    apply(setting)
                    zmlx.unpatch(model)
                    if s != "none":
                        zmlx.patch(model, patterns=s)
                    try:
                        t = issue_times(model, prompt, steps=steps, warm=3)
                        pipe = pipelined_ms(model, prompt, steps)
                    finally:
                        zmlx.unpatch(model)
                    got.setdefault((s, setting), []).append((t.build_median, t.issue_median, pipe))
                    print(
                        f"round {r} [{s}] {name}={labels[int(setting)]}: build {t.build_median:.2f} "
                        f"issue {t.issue_median:.2f} pipelined {pipe:.2f} ms",
                        flush=True,
                    )
        for s in sets if kernels else []:
            for setting in ("0", "1"):
                apply(setting)
                zmlx.unpatch(model)
                if s != "none":
                    zmlx.patch(model, patterns=s)
                try:
                    table = kernels_by_name(model, prompt)
                finally:
                    zmlx.unpatch(model)
                print(f"kernels [{s}] {name}={labels[int(setting)]}:\n{table}", flush=True)
    finally:  # each switch back as it was
        os.environ.pop("ZMLX_KERNEL_COMMENTS", None)
        core.build.cache_clear()
        mla_prologue.COMPILE_TAIL, moe_block.COMPILED = tail_before, moe_before
        gqa_prologue.COMPILED, mla_prologue.COMPILED = gqa_before, mla_before
        for blocks in (mla_prologue._BLOCKS, moe_block._BLOCKS, gqa_prologue._BLOCKS):
            blocks.clear()
    print(f"{'set':<60} {name:>9} {'build ms':>9} {'issue ms':>9} {'pipelined':>10}")
    for (s, setting), vals in got.items():
        med = [statistics.median(v[i] for v in vals) for i in range(3)]
        print(f"{s:<60} {labels[int(setting)]:>9} {med[0]:>9.2f} {med[1]:>9.2f} {med[2]:>10.2f}")


def kv_bits_sets_read_it(model, sets: list[str]) -> None:
    """ConfigError (one line) unless every set can decode over a quantized cache: on a model
    that caches MLA's latent, each set must patch every attention with mla_kv_quant (mlx-lm's
    own attention fails on the quantized cache, as `zmlx generate --kv-bits` says)."""
    from zmlx.mlx_lm_tools import KV_BITS_MLA, check_kv_quant, latent_cache

    if not latent_cache(model):
        return
    for s in sets:
        if s == "none":
            raise ConfigError(KV_BITS_MLA.format(fix="give every --sets entry mla_kv_quant (not none)"))
        try:
            check_kv_quant(zmlx.patch(model, patterns=s))
        finally:
            zmlx.unpatch(model)


def main(argv: list[str] | None = None) -> None:
    parser = cli_args.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="synth:glm4_moe_lite/flash/affine4")
    parser.add_argument("--sets", default="none", help="';'-separated pattern sets (none: stock)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="the kernels by name (CUDA)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default 10)")
    parser.add_argument(
        "--kv-bits",
        type=int,
        default=None,
        help="decode over a cache quantized as mlx-lm's --kv-bits (4 or 8, group 64; MLA: mla_kv_quant)",
    )
    parser.add_argument(
        "--ab",
        nargs=2,
        default=None,
        metavar=("NAME", "ROUNDS"),
        help=f"one switch's settings alternated: {', '.join(AB)}",
    )
    args = parser.parse_args(argv)
    sets = args.sets.split(";")
    with cli_args.one_line_errors(args.spec):  # bad input: one `error:` line, exit 2
        cli_args.at_least(1, {"--steps": args.steps, "--top": args.top})
        if args.prompt_tokens is not None:
            cli_args.at_least(1, {"--prompt-tokens": args.prompt_tokens})
        rounds = 0
        if args.ab is not None:
            if args.ab[0] not in AB:
                raise ConfigError(f"--ab {args.ab[0]}: not one of {', '.join(AB)}")
            if not args.ab[1].isdigit() or int(args.ab[1]) < 1:
                raise ConfigError(f"--ab {args.ab[0]} {args.ab[1]}: ROUNDS must be a whole number >= 1")
            rounds = int(args.ab[1])
        for s in sets:
            cli_args.selection(s, "--sets")
        if args.kv_bits is not None:
            why = latent_quant.kv_quant_error(args.kv_bits, 64)
            if why:
                raise ConfigError(why)
            if rounds:
                raise ConfigError("--kv-bits and --ab do not go together")
        knobs = {k: os.environ[k] for k in MLX_KNOBS if k in os.environ}
        print(f"backend {zmlx.backend.current()}  MLX {mx.__version__}  knobs {knobs or 'MLX defaults'}")
        model, _ = synth.build(args.spec)
        if args.kv_bits is not None:
            kv_bits_sets_read_it(model, sets)
        if rounds:
            ab(model, sets, args.steps, rounds, args.prompt_tokens, args.ab[0], args.kernels)
            return
        rows = run(
            model,
            sets,
            args.steps,
            args.top,
            not args.no_profile,
            args.kernels,
            args.prompt_tokens,
            args.kv_bits,
        )
    print(f"{'set':<60} {'build ms':>9} {'issue ms':>9} {'pipelined ms/token':>19}")
    for s, b, i, pp in rows:
        print(f"{s:<60} {b:>9.2f} {i:>9.2f} {pp:>19.2f}")


if __name__ == "__main__":
    import typer

    try:
        main()
    except typer.Exit as e:  # one_line_errors' exit, outside a typer app
        sys.exit(e.exit_code)
