"""KernelDef: one definition per fused kernel.

A kernel has a plain-MLX `reference` (the ground truth, and the path on the CPU
backend) and optionally a Metal and a CUDA body. `plan(backend)` says which path a
call on that backend takes and, when it is the reference, why; patterns record that
in the PatchResult so that a fallback is never silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

from zmlx import backend as _backend


class Plan(NamedTuple):
    backend: str  # "cpu" | "cuda" | "metal"
    path: str  # "kernel" | "reference"
    reason: str  # why the reference runs ("" when the kernel does)


@dataclass(frozen=True)
class KernelDef:
    name: str
    reference: Callable
    metal: Callable | None = None  # builds and runs the Metal kernel
    cuda: Callable | None = None  # builds and runs the CUDA kernel

    def plan(self, backend: str | None = None) -> Plan:
        backend = backend or _backend.current()
        if backend == "cpu":
            return Plan(backend, "reference", "custom kernels do not run on MLX's CPU backend")
        if getattr(self, backend) is None:
            return Plan(backend, "reference", f"no {backend} body for {self.name} yet")
        return Plan(backend, "kernel", "")

    def __call__(self, *args, **kwargs):
        plan = self.plan()
        if plan.path == "kernel":
            return getattr(self, plan.backend)(*args, **kwargs)
        return self.reference(*args, **kwargs)
