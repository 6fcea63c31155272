"""The host time to issue one decode step, on every backend.

Decode is bound by the host: Python builds each step's graph, and MLX evaluates it op by
op. This times, per greedy decode step, from calling the model on the last token to handing
the argmax to MLX with `mx.async_eval` (as mlx-lm's generate_step does): the *issue* time.
The step's evaluation (`mx.eval`) is outside the timer. Two marks are taken:

- build: the model call and the argmax return, a lazy graph (Python's part; a compiled step
  under compiled_decode replays a traced graph instead of building one);
- issue: build plus `mx.async_eval`, which schedules the graph; on a GPU backend MLX encodes
  and launches each op's kernels on the host inside that call (its per-op cost), so the two
  numbers apart say how much of a step is Python's and how much MLX's.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import mlx.core as mx

from zmlx.prefill import prefill


@dataclass
class IssueTimes:
    build_ms: list[float]  # per timed step
    issue_ms: list[float]

    @property
    def build_median(self) -> float:
        return statistics.median(self.build_ms)

    @property
    def issue_median(self) -> float:
        """One slow step (a retrace at a bucket boundary, the allocator) does not move it."""
        return statistics.median(self.issue_ms)


def issue_times(
    model, prompt: mx.array, steps: int = 16, warm: int = 2, kv_bits: int | None = None
) -> IssueTimes:
    """Milliseconds to build and to issue each of `steps` greedy decode steps, after `warm`
    steps (a trace, a kernel build), after the prompt fed into a fresh prompt cache as
    mlx-lm's generate feeds it (zmlx.prefill; with `kv_bits`, the cache quantized as mlx-lm's
    --kv-bits does, group 64)."""
    if steps < 1 or warm < 0:
        raise ValueError(f"steps must be >= 1 and warm >= 0 (got {steps}, {warm})")
    cache, logits = prefill(model, prompt, kv_bits=kv_bits)
    tok = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(tok)
    out = IssueTimes([], [])
    for i in range(warm + steps):
        t0 = time.perf_counter()
        logits = model(tok, cache=cache)
        tok = mx.argmax(logits[:, -1:], axis=-1)
        t1 = time.perf_counter()
        mx.async_eval(tok)
        t2 = time.perf_counter()
        mx.eval(tok)  # the step's evaluation: not issue time
        if i >= warm:
            out.build_ms.append((t1 - t0) * 1e3)
            out.issue_ms.append((t2 - t0) * 1e3)
    return out
