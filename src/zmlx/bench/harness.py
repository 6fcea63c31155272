"""The decode harness: variants measured alternately through mlx-lm's own generation loop.

A variant is a named set of patterns plus env overrides (`control` = stock). All
variants run in one process on one loaded model, interleaved run by run
(A B C A B C ...), so that a ratio between them means something on a noisy machine.
"""

from __future__ import annotations

import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from zmlx import backend
from zmlx.bench.issue_time import issue_times
from zmlx.config import PatchConfig
from zmlx.fidelity import Run, divergence, generate
from zmlx.kernels import ptx_cache
from zmlx.patch import patch, unpatch
from zmlx.patch.patterns import compiled_decode
from zmlx.prefill import prefill, prefill_head


@dataclass(frozen=True)
class Variant:
    name: str
    patterns: tuple[str, ...] = ()  # () = stock mlx-lm
    env: Mapping[str, str] = field(default_factory=dict)
    unsafe: bool = False  # known to change tokens or memory badly: opt in with --allow-unsafe
    note: str = ""

    @property
    def is_stock(self) -> bool:
        return not self.patterns


CONTROL = Variant("control", note="stock mlx-lm")


@dataclass
class RunNumbers:
    prompt_tps: float
    decode_tps: float
    peak_memory_gb: float
    generated_tokens: int


@dataclass
class VariantResult:
    variant: Variant
    skipped: str | None = None
    runs: list[RunNumbers] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    kernels_per_token: float | None = None
    gpu_us_per_token: float | None = None  # summed device time of those kernels
    kernels_note: str = ""
    issue_ms_per_step: float | None = None  # host time to issue one decode step (median)
    issue_note: str = ""  # why it is None after the timed runs (the measurement failed)
    build_ms_per_step: float | None = None  # of which building its graph (Python's part)
    compiled_decode: dict[str, Any] | None = None  # its stats() after the last timed run
    patch: dict[str, Any] | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)

    def stat(self, key: str) -> dict[str, float] | None:
        values = [getattr(r, key) for r in self.runs]
        if not values:
            return None
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    def to_dict(self) -> dict[str, Any]:
        v = self.variant
        return {
            "name": v.name,
            "patterns": list(v.patterns),
            "env": dict(v.env),
            "unsafe": v.unsafe,
            "note": v.note,
            "skipped": self.skipped,
            "runs": [asdict(r) for r in self.runs],
            "summary": {
                "decode_tps": self.stat("decode_tps"),
                "prompt_tps": self.stat("prompt_tps"),
                "peak_memory_gb": max((r.peak_memory_gb for r in self.runs), default=None),
            },
            "kernels_per_token": self.kernels_per_token,
            "gpu_us_per_token": self.gpu_us_per_token,
            "kernels_note": self.kernels_note,
            "issue_ms_per_step": self.issue_ms_per_step,
            "issue_note": self.issue_note,
            "build_ms_per_step": self.build_ms_per_step,
            "compiled_decode": self.compiled_decode,
            "fidelity": self.fidelity,
            "patch": self.patch,
        }


def make_prompt(vocab_size: int, n: int, seed: int = 0, avoid: Sequence[int] = ()) -> list[int]:
    """n token ids, seeded, away from the byte range and the special ids."""
    rng = np.random.default_rng(seed)
    low = min(300, vocab_size // 2)
    ids = rng.integers(low, vocab_size, size=n).tolist()
    return [i if i not in avoid else low for i in ids]


@contextmanager
def applied(model, variant: Variant):
    """The model as the variant runs it; stock again afterwards."""
    unpatch(model)
    if variant.is_stock:
        yield None
        return
    result = patch(model, variant.patterns, config=PatchConfig.from_env(overrides=variant.env))
    try:
        yield result
    finally:
        unpatch(model)


def cuda_kernels(prof) -> list:
    """The CUDA kernel events of a finished torch.profiler run (copies and memsets left out)."""
    from torch.autograd import DeviceType

    return [
        e
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]


def profile_decode(model, prompt: mx.array, steps: int = 8) -> tuple[float | None, float | None, str]:
    """(CUDA kernels per decoded token, their summed GPU time in µs per token, note) for
    the model forward + greedy argmax, from PyTorch's profiler, which sees MLX's kernels
    in the same process (CUPTI). Kernel durations are device timestamps, so the GPU time
    is free of the host's noise (launch gaps between kernels are not in it)."""
    if backend.current() != "cuda":
        return None, None, f"kernel counts need the CUDA backend (this is {backend.current()})"
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None, None, "kernel counts need PyTorch (pip install torch) for its CUDA profiler"
    cache, logits = prefill(model, prompt)
    tok = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(tok)
    for _ in range(2):  # warm: build and compile outside the profiled steps
        tok = mx.argmax(model(tok, cache=cache)[:, -1:], axis=-1)
        mx.eval(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that events are cleared per cycle
        prof = profile(activities=[ProfilerActivity.CUDA])
    with prof:
        for _ in range(steps):
            tok = mx.argmax(model(tok, cache=cache)[:, -1:], axis=-1)
            mx.eval(tok)
    kernels = cuda_kernels(prof)
    gpu_us = sum(e.time_range.elapsed_us() for e in kernels)
    return len(kernels) / steps, gpu_us / steps, f"torch.profiler, {steps} decode steps"


def _head(model, prompt: mx.array) -> tuple[list, float]:
    """The model's cache after all of `prompt` but its last token, as (each layer's state and
    meta_state: mlx-lm's prompt-cache file contents), and that prefill's tokens per second."""
    start = time.perf_counter()
    cache = prefill_head(model, prompt)
    seconds = time.perf_counter() - start
    return [(c.state, getattr(c, "meta_state", None)) for c in cache], (prompt.size - 1) / max(seconds, 1e-9)


def _run(model, tokenizer, prompt: mx.array, max_tokens: int, head: tuple[list, float] | None) -> Run:
    """One generation: the whole prompt, or (head) its last token after the kept prefill, in a
    fresh cache of the model's given that state, with the prefill's tokens per second."""
    if head is None:
        return generate(model, tokenizer, prompt, max_tokens)
    from mlx_lm.models.cache import make_prompt_cache

    states, prompt_tps = head
    cache = restore(make_prompt_cache(model), states)
    run = generate(model, tokenizer, prompt[-1:], max_tokens, prompt_cache=cache)
    return replace(run, prompt_tps=prompt_tps)


def restore(cache: list, states: list) -> list:
    """`cache` given the kept (state, meta_state) of each layer, over new array objects: a cache
    that writes rows with `keys[...] = x` into the array it was given rebinds that very
    object, which would change the kept state for the next run (mlx-lm's caches write into an
    array they made themselves; this guards any other). MLX copies a buffer that another
    array still holds, so the kept values stay as they were."""
    for c, (state, meta) in zip(cache, states):
        c.state = tree_map(lambda a: mx.array(a) if isinstance(a, mx.array) else a, state)
        if meta:
            c.meta_state = meta
    return cache


def after_runs(measure_it: Callable[[], Any], what: str) -> tuple[Any, str]:
    """(its result, "") or, where it raises, (None, why in one line): a measurement taken after
    the timed runs must not lose them (MLX's buffer cache is cleared after a failure)."""
    try:
        return measure_it(), ""
    except Exception as e:  # noqa: BLE001 - any failure: the runs are kept, the reason recorded
        mx.clear_cache()
        first = (str(e).strip().splitlines() or [""])[0]
        return None, f"{what} failed: {type(e).__name__}: {first}"[:300]


def _fidelity(control: list[list[int]], tokens: list[list[int]]) -> dict[str, Any]:
    identical, total, first = None, None, None
    for i, (a, b) in enumerate(zip(control, tokens)):
        n, div = divergence(i, a, b)
        identical = n if identical is None else min(identical, n)
        total = len(a) if total is None else max(total, len(a))
        if first is None and div is not None:
            first = asdict(div)
    verdict = "PASS" if first is None and total else "FAIL"
    return {"verdict": verdict, "identical": identical, "total": total, "first_divergence": first}


def measure(
    model,
    tokenizer,
    variants: Sequence[Variant],
    *,
    runs: int = 3,
    max_tokens: int = 200,
    prompt_tokens: int = 32,
    warmup_tokens: int = 16,
    allow_unsafe: bool = False,
    count_kernels: bool = True,
    issue_time: bool = True,
    accuracy: bool = False,
    seed: int = 0,
    prefill_once: bool = False,
    on_step: Callable[[str], None] | None = None,
    on_done: Callable[[VariantResult, VariantResult], None] | None = None,
) -> list[VariantResult]:
    """Every variant, interleaved run by run. The first variant must be stock: it is the
    baseline that the others' token fidelity is judged against. `accuracy`: also judge each
    patched variant by the accuracy rule (zmlx.accuracy: a float32 reference model, so
    twice the memory), after every timed run; its verdict is then PASS, ACCURATE or FAIL.
    After the timed runs, each variant's host time to issue a decode step (zmlx.bench.issue_time;
    `issue_time` False: not timed) and its kernels (`count_kernels`; each note says so when off);
    with compiled_decode applied, its counters (traces, compiled and stock steps) of the last run.
    `prefill_once`: each variant feeds all of the prompt but its last token once, at its
    warm-up (zmlx.prefill.prefill_head), and every run of it starts from that cache's state
    in a fresh cache of the variant's (the last token as mlx-lm's prompt): a long prompt's
    prefill is then paid once, not once a run; each run's prompt_tps is that one prefill's
    (its compiles included) and peak memory counts the kept state too.
    `on_done(control, result)` is called once for every variant after the first, as soon as
    its result is final (after its accuracy verdict, which comes set by set; a skipped variant
    at the end), so that a caller can keep it before a later set's judgement runs out of time."""
    if not variants or not variants[0].is_stock:
        raise ValueError("the first variant must be stock (control): it is the baseline")
    step = on_step or (lambda _: None)
    eos = sorted(getattr(tokenizer, "eos_token_ids", ()) or ())
    vocab = getattr(getattr(model, "args", None), "vocab_size", None) or len(tokenizer._tokenizer)
    prompt = mx.array(make_prompt(vocab, prompt_tokens, seed, avoid=eos))
    results = [VariantResult(v) for v in variants]
    active = []
    for r in results:
        if r.variant.unsafe and not allow_unsafe:
            r.skipped = "unsafe: pass --allow-unsafe to run it"
        else:
            active.append(r)
    heads: dict[int, tuple[list, float]] = {}  # prefill_once: id(result) -> (state, prompt tok/s)
    for r in active:
        with applied(model, r.variant) as result:
            r.patch = result.to_dict() if result is not None else None
            if prefill_once:
                heads[id(r)] = _head(model, prompt)
            _run(model, tokenizer, prompt, warmup_tokens, heads.get(id(r)))
        step(f"warm-up {r.variant.name}")
    ptx_cache.stop_recording()  # the kernels are built; a timed call pays no recording
    for i in range(runs):
        for r in active:
            with applied(model, r.variant) as result:
                run = _run(model, tokenizer, prompt, max_tokens, heads.get(id(r)))
                cd = result.patterns.get("compiled_decode") if result is not None else None
                if cd is not None and cd.patched:  # its counters belong to this patch: read them now
                    r.compiled_decode = compiled_decode.stats(model)
            r.runs.append(RunNumbers(run.prompt_tps, run.decode_tps, run.peak_memory_gb, len(run.tokens)))
            r.tokens.append(run.tokens)
            step(f"run {i + 1}/{runs} {r.variant.name}: {run.decode_tps:.1f} tok/s decode")
    # Issue time before the kernel counts (below), which would slow it; any backend. These
    # diagnostics come after the timed runs: one that fails (e.g. out of memory) leaves its
    # figures None with the reason, not the runs lost (2026-12-01, a 32k prompt).
    for r in active if issue_time else ():
        with applied(model, r.variant):
            times, r.issue_note = after_runs(lambda: issue_times(model, prompt), "the issue-time steps")
        if times is not None:
            r.issue_ms_per_step, r.build_ms_per_step = times.issue_median, times.build_median
            step(f"issue {r.variant.name}: {r.issue_ms_per_step:.3f} ms per decode step")
        else:
            step(f"issue {r.variant.name}: {r.issue_note}")
    # Kernel counts last: once CUPTI has been attached it slows every later launch
    # (seen on the H100: stock decode fell from ~31 to ~24 tok/s), so no timed run may follow.
    for r in active:  # what was left out on purpose says so in the line
        r.issue_note = r.issue_note if issue_time else "not timed (--no-issue-time)"
        r.kernels_note = "not counted (--no-count-kernels)" if not count_kernels else r.kernels_note
    if count_kernels:
        for r in active:
            with applied(model, r.variant):
                got, note = after_runs(lambda: profile_decode(model, prompt), "the kernel count")
            r.kernels_per_token, r.gpu_us_per_token, r.kernels_note = got or (None, None, note)
            counted = (
                f"{r.kernels_per_token} per token" if r.kernels_per_token is not None else r.kernels_note
            )
            step(f"kernels {r.variant.name}: {counted}")
    control = active[0].tokens
    for r in active:
        r.fidelity = _fidelity(control, r.tokens)
    done = on_done or (lambda control, result: None)
    # stock vs stock, or a variant judged by its env: no accuracy rule
    ruled = [accuracy and not (r.variant.is_stock or r.variant.env) for r in active]
    judged = [r for r, j in zip(active, ruled) if j]
    for r, j in zip(active[1:], ruled[1:]):
        if not j:
            done(active[0], r)
    if judged:
        from zmlx.accuracy import accuracy as judge
        from zmlx.accuracy import fixed_text_sequence, verdict

        also = [fixed_text_sequence(tokenizer)]

        for r in judged:
            acc, why = after_runs(
                lambda: judge(model, prompt, control[0], patterns=r.variant.patterns, also=also),  # noqa: B023
                "the accuracy rule",
            )
            if acc is not None:  # else the verdict stays the tokens' (PASS, or FAIL unjudged)
                r.fidelity["accuracy"] = acc.to_dict()
                r.fidelity["verdict"] = verdict(r.fidelity["verdict"] == "PASS", acc.accurate)
            else:
                r.fidelity["accuracy_note"] = why
            step(f"accuracy {r.variant.name}: {r.fidelity['verdict']}" + (f" ({why})" if why else ""))
            done(active[0], r)
    for r in results[1:]:
        if r.skipped is not None:
            done(active[0], r)
    return results
