"""Prepared kernel calls for the module patterns (moe_mlp, softmax_router, downproj_combine),
kept per module instance: the launches the block patterns prepare (zmlx.kernels.prepared).

A plain kernel call computes its launch from its arguments every time (shape and dtype checks,
the regime, the template): on a Qwen3-MoE layer the module patterns' Python cost more than
the stock ops they replace (capsule `20261202T014843_..._prepared_overhead.json`). Here a call
is prepared once per (module, kernel, backend, keyword arguments, the live arrays' shapes and
dtypes) and again when a fixed argument (a weight, its scales) is no longer the same object;
then it hands the live arrays to the built kernel. It computes what `kernel(*args, **kwargs)`
computes: the kernel where it runs and its launch takes the shapes, else the reference (a
launch that skips, the CPU, a kernel that failed its self-check). The prepared calls hold the
weights, so they live outside the module and die with it, or when the model is unpatched
(zmlx.patch.layer.blocks_of, forget).
"""

from __future__ import annotations

import operator
from typing import Any, Mapping, Sequence

from zmlx import backend as _backend
from zmlx.kernels.core import KernelDef
from zmlx.kernels.prepared import prepare
from zmlx.patch.layer import blocks_of
from zmlx.patch.layer import registry as layer_registry

# id(module) -> (a weak reference to it, {call key: (fixed arguments, prepared call)})
_CALLS = layer_registry()


def call(module, kernel: KernelDef, args: Sequence, kwargs: Mapping[str, Any], live: Sequence[int]) -> Any:
    """kernel(*args, **kwargs) through the launch prepared for `module`; `live`: the positions
    of the arguments that change from call to call (the activations, the routing), each an
    array of its own; every other argument is held and compared by identity."""
    backend = _backend.current()
    calls = blocks_of(_CALLS, module)
    key = (kernel, backend, tuple(kwargs.items()), *((args[i].shape, args[i].dtype) for i in live))
    fixed = [a for p, a in enumerate(args) if p not in live]
    entry = calls.get(key)
    if entry is None or not all(map(operator.is_, fixed, entry[0])):
        if entry is not None:  # new weights: every shape is prepared again
            calls.clear()
        entry = calls[key] = (fixed, prepare(kernel, args, kwargs, live, backend))
    return entry[1](*(args[i] for i in live))


def prepared(module) -> dict:
    """What `module`'s calls were prepared for (call key -> the prepared call): for tests and
    reports."""
    entry = _CALLS.get(id(module))
    return {k: v[1] for k, v in entry[1].items()} if entry is not None and entry[0]() is module else {}
