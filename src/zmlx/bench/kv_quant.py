"""The quantized latent cache at long context: its accuracy, bytes and decode time (issue 20).

For each context length, one prompt of that many tokens is prefilled (in chunks, as mlx-lm's
generate does) into a plain (bf16) cache of the patched model; copies of that cache are
quantized as mlx-lm's `kv_bits` quantizes it (`maybe_quantize_kv_cache`, from the first
position); then

- accuracy: the bf16 cache decodes greedily for `tokens` steps; each quantized copy and the
  float32 reference model (zmlx.accuracy: its own float32 cache) are teacher-forced over
  the same tokens. The accuracy rule judges each quantized cache against the bf16 one (the
  bf16 cache in the rule's "stock" place: same model, same patterns, only the cache differs);
- bytes: what each cache holds at that context (`latent_quant.cache_bytes`);
- decode time: synchronous decode steps over each cache, the caches alternated step block by
  step block, `repeats` blocks each (median ms per step).
- GPU time (CUDA): the kernels of a few decode steps over each cache and their summed device
  time per step (PyTorch's profiler, after every timed block; elsewhere None with the reason).

The patterns are the same on every side; mla_kv_quant must be among them (it is what lets the
MLA attention read a quantized cache).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from zmlx import latent_quant
from zmlx.accuracy import RULE, Divergences, Excess, exact_float32, log_probs, reference_model
from zmlx.bench.harness import after_runs
from zmlx.prefill import prefill as prefill_cache


@dataclass
class Side:
    """One cache at one context length."""

    name: str  # "bf16" or "q{bits}"
    bits: int | None
    cache_bytes: int = 0
    decode_ms: list[float] = field(default_factory=list)  # per timed block: ms per step
    vs_reference: Divergences | None = None
    vs_bf16: Divergences | None = None
    excess: Excess | None = None  # paired KL(ref‖this) - KL(ref‖bf16) (None for bf16 itself)
    accurate: bool | None = None  # None for the bf16 side (it is the yardstick)
    reasons: list[str] = field(default_factory=list)
    # the GPU's side of a decode step over this cache (CUDA: device timestamps, free of the
    # host's noise), after the timed blocks; None with the reason elsewhere
    kernels_per_step: float | None = None
    gpu_us_per_step: float | None = None
    kernels_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bits": self.bits,
            "cache_bytes": self.cache_bytes,
            "decode_ms_per_step": self.decode_ms,
            "decode_ms_median": statistics.median(self.decode_ms) if self.decode_ms else None,
            "kld_vs_reference": self.vs_reference.to_dict() if self.vs_reference else None,
            "kld_vs_bf16": self.vs_bf16.to_dict() if self.vs_bf16 else None,
            "excess_vs_bf16": self.excess.to_dict() if self.excess else None,
            "accurate": self.accurate,
            "reasons": self.reasons,
            "kernels_per_step": self.kernels_per_step,
            "gpu_us_per_step": self.gpu_us_per_step,
            "kernels_note": self.kernels_note,
        }


def prefill(model, prompt: mx.array, chunk: int) -> tuple[list, mx.array]:
    """A fresh prompt cache holding `prompt` (zmlx.prefill: `chunk` tokens a call) and the
    float32 next-token logits after it."""
    cache, logits = prefill_cache(model, prompt, chunk)
    out = logits[0, -1].astype(mx.float32)
    mx.eval(out)
    return cache, out


def quantized_copy(cache: list, bits: int, group_size: int) -> list:
    """mlx-lm's kv_bits quantization of a copy of `cache` (the original is not changed)."""
    from mlx_lm.generate import maybe_quantize_kv_cache

    copy = list(cache)
    maybe_quantize_kv_cache(copy, 0, group_size, bits)
    mx.eval([c.state for c in copy])
    return copy


def decode(model, cache: list, first: mx.array, tokens: Sequence[int] | None, steps: int):
    """Float32 logits after `first` and after each fed token: `tokens` (teacher-forced) or,
    when None, the greedy choice. Returns (logits, the tokens fed)."""
    outs, fed, logits = [first], [], first
    for i in range(steps):
        t = int(np.argmax(np.asarray(logits))) if tokens is None else int(tokens[i])
        fed.append(t)
        logits = model(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32)
        mx.eval(logits)
        outs.append(logits)
    return outs[:-1], fed


def time_steps(model, cache: list, token: int, steps: int) -> float:
    """ms per synchronous decode step over `cache`, feeding `token`."""
    x = mx.array([[token]])
    start = time.perf_counter()
    for _ in range(steps):
        mx.eval(model(x, cache=cache))
    return 1000.0 * (time.perf_counter() - start) / steps


def gpu_per_step(model, cache: list, token: int, steps: int = 4) -> tuple[float, float, str]:
    """(kernels, GPU µs) per decode step over `cache` and a note: PyTorch's CUDA profiler, as
    the ledger counts (zmlx.bench.harness), after one warm step. CUDA only: raises elsewhere."""
    import warnings

    from zmlx import backend
    from zmlx.bench.harness import cuda_kernels

    if backend.current() != "cuda":
        raise RuntimeError(f"kernel times need the CUDA backend (this is {backend.current()})")
    from torch.profiler import ProfilerActivity, profile

    x = mx.array([[token]])
    mx.eval(model(x, cache=cache))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that events are cleared per cycle
        prof = profile(activities=[ProfilerActivity.CUDA])
    with prof:
        for _ in range(steps):
            mx.eval(model(x, cache=cache))
    kernels = cuda_kernels(prof)
    gpu_us = sum(e.time_range.elapsed_us() for e in kernels)
    return len(kernels) / steps, gpu_us / steps, f"torch.profiler, {steps} decode steps"


def measure(
    model,
    prompt: mx.array,
    *,
    bits: Sequence[int] = (4, 8),
    group_size: int = 64,
    tokens: int = 64,
    chunk: int = 2048,
    timing_steps: int = 16,
    repeats: int = 5,
    progress: Callable[[str], None] = lambda _: None,
) -> list[Side]:
    """The sides (bf16 first, then one per bit width) at `prompt`'s length, for the model as
    it is patched now (its patterns must read a quantized cache: mla_kv_quant)."""
    for b in bits:
        why = latent_quant.kv_quant_error(b, group_size)
        if why:
            raise ValueError(why)
    if tokens < 1 or chunk < 1 or timing_steps < 1 or repeats < 1:
        raise ValueError("tokens, chunk, timing steps and repeats must be at least 1")
    n = prompt.size
    progress(f"{n} tokens: prefill")
    cache, first = prefill(model, prompt, chunk)
    sides = [Side("bf16", None)] + [Side(f"q{b}", b) for b in bits]
    caches = [cache] + [quantized_copy(cache, b, group_size) for b in bits]
    for side, c in zip(sides, caches):
        side.cache_bytes = latent_quant.cache_bytes(c)
    progress(f"{n} tokens: decode bf16")
    bf16_logits, fed = decode(model, cache, first, None, tokens)
    lp_bf16 = log_probs(bf16_logits)
    lps = [lp_bf16]
    for side, c in zip(sides[1:], caches[1:]):
        progress(f"{n} tokens: decode {side.name}")
        lps.append(log_probs(decode(model, c, first, fed, tokens)[0]))
    for _ in range(repeats):  # alternated blocks; the caches grow alike
        for side, c in zip(sides, caches):
            side.decode_ms.append(time_steps(model, c, fed[-1], timing_steps))
    # after every timed block: once CUPTI is attached it slows every later launch
    for side, c in zip(sides, caches):
        got, note = after_runs(lambda: gpu_per_step(model, c, fed[-1]), "the kernel times")  # noqa: B023
        side.kernels_per_step, side.gpu_us_per_step, side.kernels_note = got or (None, None, note)
    del caches, cache
    mx.clear_cache()
    progress(f"{n} tokens: float32 reference")
    ref = reference_model(model)
    with exact_float32():
        ref_cache, ref_first = prefill(ref, prompt, chunk)
        lp_ref = log_probs(decode(ref, ref_cache, ref_first, fed, tokens)[0])
    del ref, ref_cache
    mx.clear_cache()
    for side, lp in zip(sides, lps):
        side.vs_reference = Divergences.between(lp_ref, lp)
        side.vs_bf16 = Divergences.between(lp_bf16, lp)
    for side, lp in zip(sides[1:], lps[1:]):
        side.excess = Excess.between(lp_ref, lp, lp_bf16)
        assert sides[0].vs_reference is not None and side.vs_reference is not None
        side.accurate, side.reasons = RULE.judge(sides[0].vs_reference, side.vs_reference)
    return sides


def table_rows(results: dict[int, list[Side]]) -> list[list[str]]:
    """Rows of (context, cache, bytes vs bf16, KLD mean and p99 vs the reference, same top,
    the paired excess over bf16 (mean ± standard error), verdict, decode ms/step, GPU ms/step)
    for printing."""
    rows = []
    for n, sides in results.items():
        base = sides[0]
        for s in sides:
            ref = s.vs_reference
            ms = statistics.median(s.decode_ms) if s.decode_ms else float("nan")
            verdict = "yardstick" if s.accurate is None else ("ACCURATE" if s.accurate else "FAIL")
            rows.append(
                [
                    str(n),
                    s.name,
                    f"{s.cache_bytes / max(base.cache_bytes, 1):.3f}x",
                    f"{ref.kld_mean:.4g}" if ref else "-",
                    f"{ref.kld_p99:.4g}" if ref else "-",
                    f"{ref.same_top:.1f}%" if ref else "-",
                    f"{s.excess.mean:+.4f} ± {s.excess.sem:.4f}" if s.excess else "-",
                    verdict,
                    f"{ms:.2f}" if np.isfinite(ms) else "-",
                    f"{s.gpu_us_per_step / 1000:.2f}" if s.gpu_us_per_step is not None else "-",
                ]
            )
    return rows
