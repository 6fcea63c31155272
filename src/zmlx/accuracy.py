"""The accuracy rule: is a patched model no further from the truth than stock?

A `close` pattern cannot promise identical tokens: on a model whose routers have tiny gaps
between experts one rounding difference flips an expert and the tokens part. It is judged
instead against a float32 reference model (`reference_model`): the same weights
(quantized weights stay quantized; their scales and biases, every other parameter and
every activation in float32), computed truly in float32. Stock, patched and the
reference are teacher-forced over the same tokens (stock's greedy tokens after the
prompt, and a fixed text, `FIXED_TEXT`, so that the rule sees text no model chose) and
their next-token distributions compared as llama.cpp's `--kl-divergence`
does: KL divergence in nats per position (mean ± standard error, 99th percentile, max),
"same top token" % and the mean |Δp| of the first distribution's top token.

    from zmlx.accuracy import accuracy
    acc = accuracy(model, prompt_ids, stock_tokens, patterns=["mla_attention"])
    acc.accurate, acc.reasons, acc.to_dict()

The rule itself is `AccuracyRule` (its thresholds live there and nowhere else); the
verdict a check reports is `verdict(identical_tokens, accurate)`: PASS, ACCURATE or FAIL.

Cost: the reference is a second copy of the model (`reference_bytes`): float32 copies of
every floating parameter plus the packed quantized weights. For the flash-size affine4
model (`synth:glm4_moe_lite/flash/affine4`, weights ~17 GB by zmlx.synth.estimate_bytes)
reference_bytes of its lazily built structure is ~19 GB: ~36 GB together, plus float32
activations and a KV cache of a few hundred MB, well within one H200 (the two copies are
never run at once; the reference is freed before stock and patched run).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from zmlx import backend as _backend
from zmlx import config

# ---------------------------------------------------------------- the reference


def reference_model(model):
    """A float32 reference of an mlx-lm model: a deep copy, zmlx patches undone on the copy,
    every floating parameter cast to float32 (`nn.Module.set_dtype` converts floating
    parameters only, so packed uint32 quantized weights stay as they are; their scales and
    biases become float32). Activations follow the embeddings' dtype, so they are float32 too."""
    from zmlx.distributed import groups_memo
    from zmlx.patch import unpatch

    ref = copy.deepcopy(model, groups_memo(model))  # a sharded model's copy shares its group
    unpatch(ref)
    ref.set_dtype(mx.float32)
    return ref


def reference_bytes(model) -> int:
    """Extra memory the reference needs: 4 bytes per floating parameter, the stored size of
    every other (packed quantized) parameter. Reads shapes only: works on an unloaded,
    lazily built model structure too."""
    from mlx.utils import tree_flatten

    total = 0
    for item in tree_flatten(model.parameters()):
        a = item[1]
        assert isinstance(a, mx.array)
        total += a.size * 4 if mx.issubdtype(a.dtype, mx.floating) else a.nbytes
    return total


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Where the reference runs so that its float32 is float32. MLX's CUDA backend runs
    float32 matmuls as TF32 unless MLX_ENABLE_TF32=0, a setting MLX reads once per process
    (see zmlx.config.tf32_enabled); with TF32 on, the reference runs on the CPU stream,
    which computes float32 exactly. Metal and the CPU have no TF32: nothing to do."""
    if _backend.current() == "cuda" and config.tf32_enabled():
        with mx.stream(mx.cpu):
            yield
    else:
        yield


# ---------------------------------------------------------------- statistics


def log_probs(logits: Sequence[mx.array]) -> np.ndarray:
    """(positions, vocab) log-softmax of float32 logits, computed in float64: in float32 the
    cancellation noise of a KL divergence is of the order of the rule's 1e-6 slack."""
    x = np.stack([np.asarray(lg.astype(mx.float32), dtype=np.float64) for lg in logits])
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kld_per_position(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(P‖Q) in nats at each position, from log-probabilities (positions, vocab)."""
    return np.maximum((np.exp(p) * (p - q)).sum(axis=-1), 0.0)  # >= 0 in exact arithmetic


@dataclass(frozen=True)
class Excess:
    """How much further from the reference side `a` is than side `b`, position by position:
    the mean and standard error of KL(ref‖a) - KL(ref‖b) over the same positions. Paired,
    so what both sides share (the model's own distance from the reference at a position)
    cancels and a difference well inside the aggregates' noise still shows."""

    positions: int
    mean: float  # nats per position; > 0: `a` is further from the reference
    sem: float

    @classmethod
    def between(cls, ref: np.ndarray, a: np.ndarray, b: np.ndarray) -> "Excess":
        d = kld_per_position(ref, a) - kld_per_position(ref, b)
        n = d.shape[0]
        if n == 0:
            return cls(0, float("nan"), float("nan"))
        sem = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        return cls(n, float(d.mean()), sem)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Divergences:
    """KL(P‖Q) of two models' next-token distributions over the same positions, the way
    llama.cpp's --kl-divergence reports it (P the first, reference-side distribution)."""

    positions: int
    kld_mean: float  # nats per position
    kld_sem: float  # standard error of the mean
    kld_p99: float
    kld_max: float
    same_top: float  # % of positions where both have the same top token
    mean_abs_dp: float  # mean |p(top) - q(top)|, top = P's top token

    @classmethod
    def between(cls, p: np.ndarray, q: np.ndarray) -> "Divergences":
        n = p.shape[0]
        if n == 0:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan, nan)
        pp = np.exp(p)
        kld = kld_per_position(p, q)
        top = p.argmax(axis=-1)
        rows = np.arange(n)
        dp = np.abs(pp[rows, top] - np.exp(q[rows, top]))
        sem = float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        return cls(
            positions=n,
            kld_mean=float(kld.mean()),
            kld_sem=sem,
            kld_p99=float(np.percentile(kld, 99)),
            kld_max=float(kld.max()),
            same_top=float(100.0 * (top == q.argmax(axis=-1)).mean()),
            mean_abs_dp=float(dp.mean()),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- the rule


@dataclass(frozen=True)
class AccuracyRule:
    """A set of `close` patterns is accurate when the patched model is no further from the
    float32 reference than stock is:

      mean KLD(ref‖patched) <= kld_ratio * mean KLD(ref‖stock) + kld_slack
      p99  KLD(ref‖patched) <= kld_ratio * p99  KLD(ref‖stock) + kld_slack
      same-top(ref, patched) >= same-top(ref, stock) - top1_points

    Why: stock's own distance to the truth is the error users already accept, so it is the
    yardstick; a ratio (not a fixed tolerance) scales with the model and the quantization.
    1.1x leaves room for the noise of where roundings land, not for a systematic error;
    the mean catches an error everywhere, the p99 one that hides in a few positions. The
    slack (nats) keeps a bitwise-exact stock (KLD 0, e.g. a float32 model on the CPU) from
    demanding the impossible of a merely reordered sum. Top-1 agreement is in percentage
    points: 0.5 is one position in 200."""

    kld_ratio: float = 1.1
    kld_slack: float = 1e-6
    top1_points: float = 0.5

    def judge(self, stock: Divergences, patched: Divergences) -> tuple[bool, list[str]]:
        """(accurate, reasons it is not): `stock` is ref‖stock, `patched` is ref‖patched."""
        reasons = []
        for what, s, p in (
            ("mean", stock.kld_mean, patched.kld_mean),
            ("p99", stock.kld_p99, patched.kld_p99),
        ):
            bound = self.kld_ratio * s + self.kld_slack
            if not p <= bound:  # also catches NaN
                reasons.append(
                    f"{what} KLD(ref‖patched) {p:.3e} > "
                    f"{self.kld_ratio} x stock's {s:.3e} + {self.kld_slack:g}"
                )
        if not patched.same_top >= stock.same_top - self.top1_points:
            reasons.append(
                f"same top token as ref {patched.same_top:.2f}% < stock's {stock.same_top:.2f}% "
                f"- {self.top1_points} points"
            )
        return not reasons, reasons

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


RULE = AccuracyRule()


def verdict(identical_tokens: bool, accurate: bool | None) -> str:
    """PASS: identical tokens to stock; ACCURATE: tokens differ but the rule holds; FAIL
    otherwise (also when the rule was not checked)."""
    if identical_tokens:
        return "PASS"
    return "ACCURATE" if accurate else "FAIL"


# ---------------------------------------------------------------- the whole check


@dataclass
class Accuracy:
    ref_stock: Divergences
    ref_patched: Divergences
    stock_patched: Divergences
    accurate: bool
    reasons: list[str]
    rule: AccuracyRule = RULE
    # KL(ref‖patched) - KL(ref‖stock), paired by position: whether a difference the rule's
    # aggregates see is beyond the positions' noise (reported, not judged)
    excess: Excess | None = None

    def rows(self) -> list[tuple[str, Divergences]]:
        """The table's rows, in llama.cpp's order of comparison."""
        return [
            ("ref‖stock", self.ref_stock),
            ("ref‖patched", self.ref_patched),
            ("stock‖patched", self.stock_patched),
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref_stock": self.ref_stock.to_dict(),
            "ref_patched": self.ref_patched.to_dict(),
            "stock_patched": self.stock_patched.to_dict(),
            "accurate": self.accurate,
            "reasons": list(self.reasons),
            "rule": self.rule.to_dict(),
            **({"excess": self.excess.to_dict()} if self.excess else {}),
        }


Sequence_ = tuple[Sequence[int] | mx.array, Sequence[int]]  # (prompt ids, tokens fed after it)

# A plain passage teacher-forced next to stock's own tokens: text the models did not choose.
FIXED_TEXT = (
    "The river rose through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the ridge, where the old church stood above the valley. "
    "Nobody could remember a flood like it; the oldest stones of the bridge still carried "
    "marks from a storm two hundred years before, and the water reached them by noon. "
    "In the afternoon the rain stopped. Children counted the boats drifting past the mill, "
    "and the baker, whose ovens stood dry on the high street, gave away bread to anyone "
    "who had walked up from the farms. By evening the level had fallen a hand's width, "
    "and people began to talk about the harvest, the roads, and the cost of new fences."
)


def fixed_text_sequence(tokenizer, prompt_tokens: int = 8) -> Sequence_:
    """FIXED_TEXT in `tokenizer`'s ids, split into a short prompt and the tokens after it."""
    ids = list(tokenizer.encode(FIXED_TEXT))
    return ids[:prompt_tokens], ids[prompt_tokens:]


def compare(
    model,
    prompt: Sequence[int] | mx.array,
    tokens: Sequence[int],
    apply: Callable[[Any], Callable[[], None]],
    rule: AccuracyRule = RULE,
    also: Sequence[Sequence_] = (),
) -> Accuracy:
    """The check with any change to the model: `apply(model)` changes it in place and
    returns the function that undoes it. `model` must be stock when called; it is stock
    again on return. `also`: more (prompt, tokens) sequences whose positions join the
    statistics. The reference copy is freed before stock and patched run."""
    from zmlx.fidelity import teacher_forced_logits

    seqs = [
        (p if isinstance(p, mx.array) else mx.array(list(p)), list(t)) for p, t in [(prompt, tokens), *also]
    ]

    def logp(m) -> np.ndarray:
        return np.concatenate([log_probs(list(teacher_forced_logits(m, p, t))) for p, t in seqs])

    ref = reference_model(model)
    with exact_float32():
        lp_ref = logp(ref)
    del ref
    mx.clear_cache()
    lp_stock = logp(model)
    undo = apply(model)
    try:
        lp_patched = logp(model)
    finally:
        undo()
    ref_stock = Divergences.between(lp_ref, lp_stock)
    ref_patched = Divergences.between(lp_ref, lp_patched)
    ok, reasons = rule.judge(ref_stock, ref_patched)
    stock_patched = Divergences.between(lp_stock, lp_patched)
    excess = Excess.between(lp_ref, lp_patched, lp_stock)
    return Accuracy(ref_stock, ref_patched, stock_patched, ok, reasons, rule, excess)


def accuracy(
    model,
    prompt: Sequence[int] | mx.array,
    tokens: Sequence[int],
    patterns: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    preset: config.Preset | None = None,
    also: Sequence[Sequence_] = (),
) -> Accuracy:
    """The accuracy rule for `zmlx.patch(model, patterns, exclude, preset=)` on a loaded (stock)
    mlx-lm model: teacher-forced over `prompt` (token ids) then `tokens` (stock's greedy
    continuation), and over each (prompt, tokens) of `also` (e.g. `fixed_text_sequence`).
    Needs memory for a second copy of the model (`reference_bytes`)."""
    from zmlx.patch import patch, unpatch

    def apply(m):
        patch(m, patterns, exclude, preset=preset)
        return lambda: unpatch(m)

    return compare(model, prompt, tokens, apply, also=also)
