"""KernelDef: one definition per fused kernel.

A kernel has a plain-MLX `reference` (the ground truth, and the path on the CPU
backend) and one shared `body` for Metal and CUDA. Each backend gets a short
prelude: macros in the header, and a first line that names the thread index (MLX
declares Metal's `thread_position_in_grid` only when the source mentions it):

    zmlx_tid      this thread's index along x (the grid counts threads)
    ZMLX_MUL/ADD  float32 multiply / add, rounded separately (no FMA contraction
                  where mlx-lm rounds in between)

`launch(*args)` computes the geometry and template from the shapes, or returns the
reason this call takes the reference. Before a kernel is first used on a backend it
is built and checked against the reference on `example()` inputs (bitwise for an
`exact` kernel); a build failure or a mismatch makes that backend take the
reference, and `plan()` says why, so the PatchResult records it: never silent.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import mlx.core as mx

from zmlx import backend as _backend

PRELUDE_HEADER = {
    "cuda": (
        "typedef unsigned int uint;\n"
        "#define ZMLX_MUL(a, b) __fmul_rn((a), (b))\n"
        "#define ZMLX_ADD(a, b) __fadd_rn((a), (b))\n"
    ),
    "metal": (
        "#define ZMLX_MUL(a, b) ((a) * (b))\n"
        "#define ZMLX_ADD(a, b) ((a) + (b))\n"
    ),
}
PRELUDE_SOURCE = {
    "cuda": "const uint zmlx_tid = blockIdx.x * blockDim.x + threadIdx.x;\n",
    "metal": "const uint zmlx_tid = thread_position_in_grid.x;\n",
}


class Plan(NamedTuple):
    backend: str  # "cpu" | "cuda" | "metal"
    path: str  # "kernel" | "reference"
    reason: str  # why the reference runs ("" when the kernel does)


class Launch(NamedTuple):
    inputs: list
    template: list
    grid: tuple
    threadgroup: tuple
    output_shapes: list
    output_dtypes: list


@dataclass(frozen=True, eq=False)
class KernelDef:
    name: str
    reference: Callable
    fidelity: str = "exact"  # "exact": bitwise equal to reference; "close": within tolerance
    body: str | None = None
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    # launch(backend, *args, **kwargs) -> Launch, or a str: why this call takes the reference
    launch: Callable[..., Launch | str] | None = None
    # example() -> (args, kwargs): small inputs for the pre-use check
    example: Callable[[], tuple[tuple, dict]] | None = None
    header: str = ""
    _status: dict = field(default_factory=dict, repr=False)  # backend -> "" or failure reason

    def source(self, backend: str) -> tuple[str, str]:
        """(header, source) exactly as handed to mx.fast.<backend>_kernel."""
        return PRELUDE_HEADER[backend] + self.header, PRELUDE_SOURCE[backend] + self.body

    def plan(self, backend: str | None = None) -> Plan:
        backend = backend or _backend.current()
        if backend == "cpu":
            return Plan(backend, "reference", "custom kernels do not run on MLX's CPU backend")
        if self.body is None:
            return Plan(backend, "reference", f"no {backend} body for {self.name} yet")
        if backend not in self._status:
            self._status[backend] = self._check(backend)
        reason = self._status[backend]
        return Plan(backend, "reference" if reason else "kernel", reason)

    def _check(self, backend: str) -> str:
        """Build and run once on the example; '' if it matches the reference."""
        if self.example is None:
            return ""
        args, kwargs = self.example()
        try:
            got = self.run_kernel(backend, *args, **kwargs)
            want = self.reference(*args, **kwargs)
            mx.eval(got, want)
        except Exception as e:  # a build or launch failure: take the reference, say why
            return f"{self.name} {backend} kernel failed to build or run: {str(e).splitlines()[0][:200]}"
        if isinstance(got, str):
            return f"{self.name} {backend} kernel does not take its own example: {got}"
        if self.fidelity == "exact" and not mx.array_equal(got, want).item():
            return f"{self.name} {backend} kernel is not bitwise equal to the reference on its self-check"
        return ""

    def run_kernel(self, backend: str, *args, init_value: float | None = None, **kwargs):
        """The fused kernel itself (no fallback); a str when the shapes do not fit it."""
        spec = self.launch(backend, *args, **kwargs)
        if isinstance(spec, str):
            return spec
        kernel = _build(self, backend)
        extra = {"init_value": init_value} if init_value is not None else {}
        outs = kernel(
            inputs=spec.inputs, template=spec.template, grid=spec.grid,
            threadgroup=spec.threadgroup, output_shapes=spec.output_shapes,
            output_dtypes=spec.output_dtypes, **extra,
        )
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __call__(self, *args, **kwargs):
        plan = self.plan()
        if plan.path == "kernel":
            out = self.run_kernel(plan.backend, *args, **kwargs)
            if not isinstance(out, str):
                return out
        return self.reference(*args, **kwargs)


@functools.cache
def _build(kernel: KernelDef, backend: str) -> Any:
    header, source = kernel.source(backend)
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    return make(
        name=f"zmlx_{kernel.name}",
        input_names=list(kernel.input_names),
        output_names=list(kernel.output_names),
        source=source,
        header=header,
    )
