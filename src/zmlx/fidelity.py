"""Token fidelity and throughput of a patched model against stock mlx-lm (the library of
`python -m zmlx.validate`; the command itself is zmlx.cli.validate).

The model is loaded once; stock and patched runs alternate on it (unpatch/patch),
greedy, through mlx-lm's own `stream_generate`. Fidelity: identical tokens n/N and
the first divergence per run; then, teacher-forced on the stock tokens, top-1
agreement, max |logit difference| and the logits' correlation; with `accuracy=True`
also the accuracy rule against a float32 reference (zmlx.accuracy). The verdict:
PASS (identical tokens), ACCURATE (tokens differ, the rule holds) or FAIL.
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence, cast

import mlx.core as mx

from zmlx import backend as _backend
from zmlx.accuracy import Accuracy, fixed_text_sequence
from zmlx.accuracy import accuracy as accuracy_check
from zmlx.accuracy import verdict as accuracy_verdict
from zmlx.config import ConfigError, Preset
from zmlx.families import FAMILIES
from zmlx.patch import PatchResult, ZmlxWarning, patch, unpatch
from zmlx.prefill import prefill

DEFAULT_PROMPT = "The history of the city begins with a small harbour where fishermen"


class NothingToValidate(ConfigError):
    """The selection patches no module of this model: a fidelity check would prove nothing."""


@dataclass
class Run:
    tokens: list[int]
    prompt_tps: float
    decode_tps: float
    peak_memory_gb: float


@dataclass
class Divergence:
    run: int
    position: int
    stock_token: int | None
    patched_token: int | None


@dataclass
class Report:
    model: str
    family: str | None
    quantization: str
    backend: str
    device: str
    patterns: list[str]
    patch: dict[str, Any]
    prompt_tokens: int
    max_tokens: int
    runs: int
    stock: list[Run] = field(default_factory=list)
    patched: list[Run] = field(default_factory=list)
    identical: int = 0  # tokens equal to stock, worst run (common prefix)
    total: int = 0  # tokens the stock run generated
    first_divergence: Divergence | None = None
    stock_deterministic: bool = True
    teacher_forced_top1: float = float("nan")
    max_abs_dlogit: float = float("nan")
    logit_correlation: float = float("nan")
    accuracy: Accuracy | None = None  # the accuracy rule, when checked
    model_label: str | None = None  # a layer-faithful synthetic model's label (ModelSource.label)

    @property
    def passed(self) -> bool:
        """Identical tokens to stock in every run."""
        return self.total > 0 and self.identical == self.total and self.first_divergence is None

    @property
    def verdict(self) -> str:
        """PASS, ACCURATE (tokens differ but the accuracy rule holds) or FAIL."""
        return accuracy_verdict(self.passed, self.accuracy.accurate if self.accuracy else None)

    @property
    def ok(self) -> bool:
        """PASS or ACCURATE: what exit status 0 means."""
        return self.verdict != "FAIL"

    def median(self, which: str, key: str) -> float:
        return statistics.median(getattr(r, key) for r in getattr(self, which))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict
        d["accuracy"] = self.accuracy.to_dict() if self.accuracy else None
        for which in ("stock", "patched"):
            for r in d[which]:
                r.pop("tokens")
            d[f"{which}_median"] = {
                k: self.median(which, k) for k in ("prompt_tps", "decode_tps", "peak_memory_gb")
            }
        d["decode_speedup"] = d["patched_median"]["decode_tps"] / d["stock_median"]["decode_tps"]
        d["stock_tokens"] = self.stock[0].tokens if self.stock else []
        return d


# ---------------------------------------------------------------- measuring


def scalar(x: mx.array) -> float:
    """A real-valued one-element array as a float (MLX types `.item()` as int | float | complex)."""
    return cast(float, x.item())


def generate(model, tokenizer, prompt: mx.array, max_tokens: int, prompt_cache: list | None = None) -> Run:
    """Greedy generation through mlx-lm's stream_generate (continuing `prompt_cache`, which
    then already holds all of the prompt but `prompt`, when given)."""
    from mlx_lm.generate import stream_generate

    mx.reset_peak_memory()
    tokens, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, prompt_cache=prompt_cache):
        tokens.append(int(last.token))
    if last is None:
        return Run([], 0.0, 0.0, 0.0)
    if last.finish_reason == "stop":  # the end-of-text token is yielded but not generated text
        tokens = tokens[:-1] if tokens and tokens[-1] in tokenizer.eos_token_ids else tokens
    return Run(tokens, last.prompt_tps, last.generation_tps, mx.get_peak_memory() / 1e9)


def teacher_forced_logits(model, prompt: mx.array, tokens: Sequence[int]):
    """Yields the float32 next-token logits after the prompt and after each token,
    feeding `tokens` one at a time through the KV cache (the decode path); the prompt goes in
    as mlx-lm's generate feeds it (zmlx.prefill)."""
    cache, logits = prefill(model, prompt)
    logits = logits[0, -1]
    for t in tokens:
        out = logits.astype(mx.float32)
        mx.eval(out)
        yield out
        logits = model(mx.array([[t]]), cache=cache)[0, -1]


def greedy_logits(model, prompt: mx.array, steps: int) -> list[mx.array]:
    """The logits of `prompt` (B, L) through a fresh prompt cache, then of `steps` greedy
    decode steps after it, evaluated: the raw outputs the exactness checks compare."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(prompt, cache=cache)
    outs = [logits]
    for _ in range(steps):
        logits = model(mx.argmax(logits[:, -1:], axis=-1), cache=cache)
        outs.append(logits)
    mx.eval(outs)
    return outs


def divergence(run: int, stock: list[int], patched: list[int]) -> tuple[int, Divergence | None]:
    """(length of the common prefix, the first divergence or None when identical)."""
    n = 0
    for a, b in zip(stock, patched):
        if a != b:
            break
        n += 1
    if n == len(stock) == len(patched):
        return n, None
    at = lambda seq: seq[n] if n < len(seq) else None  # noqa: E731
    return n, Divergence(run, n, at(stock), at(patched))


def validate(
    model,
    tokenizer,
    *,
    model_name: str = "<model>",
    quantization: str = "",
    patterns: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    max_tokens: int = 200,
    runs: int = 3,
    prompt: str = DEFAULT_PROMPT,
    warmup_tokens: int = 8,
    on_step: Callable[[str], None] | None = None,
    accuracy: bool = False,
    preset: Preset | None = None,
) -> Report:
    """Stock and patched, alternating on one model; returns the Report (model left stock).
    `accuracy`: also judge the patched model by the accuracy rule (zmlx.accuracy), which
    needs memory for a float32 reference copy of the model."""
    if max_tokens < 1 or runs < 1:
        raise ConfigError("--max-tokens and --runs must be at least 1")
    step = on_step or (lambda _: None)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ConfigError("the prompt encodes to no tokens")
    prompt_arr = mx.array(ids)
    unpatch(model)
    with warnings.catch_warnings():  # the reason goes into NothingToValidate, said once
        warnings.filterwarnings("ignore", "nothing to patch", category=ZmlxWarning)
        result = patch(model, patterns, exclude, preset=preset)
    applied = [n for n, r in result.patterns.items() if r.patched]
    unpatch(model)
    if not applied:
        raise NothingToValidate(f"nothing to validate: {why_nothing_patched(result)}")
    report = Report(
        model=model_name,
        family=result.family,
        quantization=quantization,
        backend=_backend.current(),
        device=_backend.device_name(),
        patterns=applied,
        patch=result.to_dict(),
        prompt_tokens=len(ids),
        max_tokens=max_tokens,
        runs=runs,
    )

    def patched_run(fn):
        patch(model, patterns, exclude, preset=preset)
        try:
            return fn()
        finally:
            unpatch(model)

    # Warm-up: compile and allocate once for each side before anything is timed.
    generate(model, tokenizer, prompt_arr, warmup_tokens)
    patched_run(lambda: generate(model, tokenizer, prompt_arr, warmup_tokens))
    step("warm-up")
    for i in range(runs):
        report.stock.append(generate(model, tokenizer, prompt_arr, max_tokens))
        step(f"stock run {i + 1}")
        report.patched.append(patched_run(lambda: generate(model, tokenizer, prompt_arr, max_tokens)))
        step(f"patched run {i + 1}")

    reference = report.stock[0].tokens
    report.total = len(reference)
    report.stock_deterministic = all(r.tokens == reference for r in report.stock)
    report.identical = report.total
    for i, (s, p) in enumerate(zip(report.stock, report.patched)):
        n, div = divergence(i, s.tokens, p.tokens)
        report.identical = min(report.identical, n)
        if div is not None and report.first_divergence is None:
            report.first_divergence = div

    if reference:
        stock_logits = list(teacher_forced_logits(model, prompt_arr, reference))
        step("teacher-forced stock")
        agree, max_d = 0, 0.0
        sx = sy = sxx = syy = sxy = 0.0
        count = 0
        patch(model, patterns, exclude, preset=preset)
        try:
            for a, b in zip(stock_logits, teacher_forced_logits(model, prompt_arr, reference)):
                agree += int(mx.argmax(a).item() == mx.argmax(b).item())
                max_d = max(max_d, scalar(mx.abs(a - b).max()))
                sx += a.sum().item()
                sy += b.sum().item()
                sxx += (a * a).sum().item()
                syy += (b * b).sum().item()
                sxy += (a * b).sum().item()
                count += a.size
        finally:
            unpatch(model)
        step("teacher-forced patched")
        report.teacher_forced_top1 = agree / len(reference)
        report.max_abs_dlogit = max_d
        cov = sxy / count - (sx / count) * (sy / count)
        var = (sxx / count - (sx / count) ** 2) * (syy / count - (sy / count) ** 2)
        report.logit_correlation = cov / math.sqrt(var) if var > 0 else float("nan")
        if accuracy:
            report.accuracy = accuracy_check(
                model, prompt_arr, reference, patterns, exclude, preset, also=[fixed_text_sequence(tokenizer)]
            )
            step("accuracy rule")
    return report


def why_nothing_patched(result: PatchResult) -> str:
    """Why a patch left every module of the model stock, in words."""
    if result.family not in FAMILIES:
        return (
            f"model_type {result.family!r} has no zmlx patterns "
            f"(supported: {', '.join(sorted(FAMILIES))}); the model would run stock"
        )
    if result.patterns:  # selected, but every module was skipped
        return (
            "no module matched the selected patterns ("
            + "; ".join(
                f"{n}: {', '.join(sorted({w for _, w in r.skipped}))}" for n, r in result.patterns.items()
            )
            + ")"
        )
    left_out = ", ".join(f"{n}: {w}" for n, w in result.not_selected.items() if not w.startswith("not in"))
    return f"every selected pattern is left out ({left_out})" if left_out else "no patterns selected (none)"
