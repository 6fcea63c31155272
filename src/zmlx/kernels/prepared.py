"""Prepared launches: a kernel call with everything that depends only on shapes, dtypes and
weights computed once.

At decode the shapes do not change from one token to the next, so a block pattern prepares
each of its launches once per (layer, input shapes, dtypes): the plan (kernel or reference,
and why), the launch's Skip decision, its Launch (the weight inputs, template, grid,
threadgroup, output shapes and dtypes) and the built kernel. A call then hands the few
per-call ("live") arrays to the built kernel, and nothing else is recomputed.

One definition: a prepared kernel call passes MLX exactly what `KernelDef.run_kernel`
passes for the same arguments (`core.kernel_kwargs`), with the live arrays in the input
slots where launch() put them. What makes that sound is the rule of KernelDef's docstring:
launch() reads the live arguments only through their shapes and dtypes, and passes each
through as an input unchanged; `prepare` refuses a launch that does not. A live argument that
launch() reads into an input of its own (mla_q_prep's position, read as the rope table's
row `cs`) is `derived`: the kernel is called with that input, which its caller computes
each step, and the reference with the argument itself. A prepared launch
holds for live arrays of the shapes and dtypes it was prepared with: its caller keys it by
them. The self-check and fallback rules are KernelDef.plan's: a kernel that failed its
self-check on this backend (or has no body there, e.g. the CPU) is prepared as its
reference, with the plan's reason.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import mlx.core as mx

from zmlx import backend as _backend
from zmlx.backend import Backend
from zmlx.kernels import core
from zmlx.kernels.core import KernelDef, Skip, kernel_kwargs, outputs


class Prepared:
    """One prepared launch. Call it with the live arrays, in the order `live` named them.

    path: "kernel" or "reference"; reason: why the reference runs ("" for the kernel);
    skip: the launch's Skip reason for these shapes (then path is "reference"), else None."""

    __slots__ = ("kernel", "path", "reason", "skip")

    def __init__(self, kernel: KernelDef, path: str, reason: str, skip: str | None):
        self.kernel, self.path, self.reason, self.skip = kernel, path, reason, skip

    def __call__(self, *live: mx.array) -> Any:
        raise NotImplementedError


class KernelCall(Prepared):
    """The built kernel with the Launch's inputs, the live ones put in their slots."""

    __slots__ = ("_fn", "_inputs", "_slots", "_kw")

    def __init__(self, kernel: KernelDef, fn, inputs: Sequence, slots: tuple[tuple[int, int], ...], kw: dict):
        super().__init__(kernel, "kernel", "", None)
        inputs = list(inputs)
        for slot, _ in slots:  # hold no live array: it would keep its step's graph alive
            inputs[slot] = None
        self._fn, self._inputs, self._slots, self._kw = fn, inputs, slots, kw

    def __call__(self, *live: mx.array) -> Any:
        inputs = self._inputs.copy()
        for slot, i in self._slots:
            inputs[slot] = live[i]
        return outputs(self._fn(inputs=inputs, **self._kw))


class ReferenceCall(Prepared):
    """The kernel's reference with the prepared arguments, the live ones put in place."""

    __slots__ = ("_args", "_positions", "_kwargs")

    def __init__(self, kernel: KernelDef, args: Sequence, positions, kwargs: dict, reason: str, skip):
        super().__init__(kernel, "reference", reason, skip)
        args = list(args)
        for position in positions:  # hold no live array: it would keep its step's graph alive
            args[position] = None
        self._args, self._positions, self._kwargs = args, tuple(positions), kwargs

    def __call__(self, *live: mx.array) -> Any:
        args = self._args.copy()
        for i, position in enumerate(self._positions):
            args[position] = live[i]
        return self.kernel.reference(*args, **self._kwargs)


def _check_live(kernel: KernelDef, args: Sequence, live: Sequence[int], derived: Mapping[int, str]) -> None:
    """ValueError unless each live argument is an array of its own: found by identity among
    a launch's inputs, it must not also be a fixed argument or another live one (a derived
    one is not looked for: it must be live and name one of the kernel's inputs)."""
    for position, name in derived.items():
        if position not in live or name not in kernel.input_names:
            raise ValueError(
                f"{kernel.name}: derived argument {position} -> {name!r} is not a live one to an input"
            )
    fixed = {id(a) for p, a in enumerate(args) if p not in live}
    seen: set[int] = set()
    for position in live:
        if position in derived:
            continue
        a = args[position]
        if not isinstance(a, mx.array) or id(a) in fixed or id(a) in seen:
            raise ValueError(
                f"{kernel.name}: live argument {position} must be an array of its own "
                "(not None, not also a fixed or another live argument)"
            )
        seen.add(id(a))


def _slots(
    kernel: KernelDef, inputs: Sequence, args: Sequence, live: Sequence[int], derived: Mapping[int, str]
) -> tuple:
    """(input slot, index in `live`) for every input that is a live argument, by identity, or
    that a derived one names; ValueError when launch() did not pass a live argument through
    unchanged."""
    slots = []
    for i, position in enumerate(live):
        if position in derived:
            slots.append((kernel.input_names.index(derived[position]), i))
            continue
        found = [(slot, i) for slot, x in enumerate(inputs) if x is args[position]]
        if not found:
            raise ValueError(
                f"{kernel.name}: launch() does not pass live argument {position} through as an input "
                "unchanged, so its launch cannot be prepared"
            )
        slots.extend(found)
    return tuple(slots)


def prepare(
    kernel: KernelDef,
    args: Sequence,
    kwargs: Mapping[str, Any] | None = None,
    live: Sequence[int] = (),
    backend: Backend | None = None,
    derived: Mapping[int, str] | None = None,
) -> Prepared:
    """`kernel` prepared for `args` (positional) and `kwargs`: a later call with the arrays
    at positions `live` of the same shapes and dtypes computes what `kernel(*args, **kwargs)`
    would with them. launch() is asked on every backend, so a shape it skips is skipped
    everywhere (`skip`), even where the reference would run anyway (the CPU).

    derived: live positions that launch() reads into an input of its own -> that input's
    name. Where `path` is "kernel" a call takes that input's value in their place, where it
    is "reference" the argument itself (its caller gives each what the path takes)."""
    backend = backend or _backend.current()
    kwargs = dict(kwargs or {})
    derived = dict(derived or {})
    _check_live(kernel, args, live, derived)
    spec = kernel.launch(backend, *args, **kwargs) if kernel.launch is not None else None
    if isinstance(spec, Skip):
        return ReferenceCall(kernel, args, live, kwargs, spec.reason, spec.reason)
    # the contract is checked on every backend, so the CPU's tests hold it for the GPU
    slots = _slots(kernel, list(args) if spec is None else spec.inputs, args, live, derived)
    plan = kernel.plan(backend)
    if plan.path == "reference" or spec is None:
        return ReferenceCall(kernel, args, live, kwargs, plan.reason, None)
    if core.RECORD is not None and backend == "cuda":
        core.RECORD(kernel, spec)
    return KernelCall(kernel, core.build(kernel, backend), spec.inputs, slots, kernel_kwargs(spec))


def key(*live: mx.array) -> tuple:
    """What a prepared launch holds for: the live arrays' shapes and dtypes."""
    return tuple((a.shape, a.dtype) for a in live)
