"""KernelDef: one definition per fused kernel.

A kernel has a plain-MLX `reference` (the ground truth, and the path on the CPU
backend) and one shared `body` for Metal and CUDA. Device code longer than a few lines
lives in files under kernels/csrc/ (shared headers, long bodies), read by `device_code`;
MLX, the Metal emulation and the NVRTC check all get it through `KernelDef.source`, so
there is one copy of each. Each backend gets a short prelude: macros in the header
(csrc/prelude_cuda.h, csrc/prelude_metal.h), and a first line that names the thread
index (MLX declares Metal's `thread_position_in_grid` only when the source mentions it):

    zmlx_tid      this thread's index along x (the grid counts threads)
    zmlx_lid      its index in its threadgroup (block), zmlx_gid the threadgroup's
    zmlx_lane     its lane in its 32-wide simdgroup (warp), zmlx_warp that warp's index
    ZMLX_MUL/ADD  float32 multiply / add, rounded separately (no FMA contraction
                  where mlx-lm rounds in between)
    ZMLX_SHARED   threadgroup (shared) memory qualifier; ZMLX_BARRIER a threadgroup barrier
    ZMLX_SHFL_XOR(v, m)  the float v of lane (lane ^ m) in this warp (every lane must call)
    ZMLX_DEVICE   the address space of kernel buffers in helper functions (Metal `device`)
    ZMLX_FLOAT_BITS(i)  the float whose bits are the int i (float constants travel
                  as int template arguments: see float_bits())
    ZMLX_CUDA / ZMLX_METAL  defined on that backend, for the few lines that must differ

`launch(*args)` computes the geometry and template from the shapes (a `Launch`), or
says why this call takes the reference (a `Skip`). Values that change per call (a context
length, a position) travel in an input's shape (`NAME_shape`, which MLX passes when the
body names it), as a view of an existing array, or in the template; never as a small array
made on the host per call: MLX's CUDA backend puts such an array in managed memory and the
kernel waits for its page (tests/kernels/test_core.py checks every kernel's launch).

Before a kernel is first used on a backend it is built and checked against the
reference on `example()` inputs (bitwise for an `exact` kernel); a build failure or a
mismatch makes that backend take the reference, and `plan()` says why, so the
PatchResult records it: never silent.
"""

from __future__ import annotations

import functools
import struct
import weakref
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Literal, NamedTuple

import mlx.core as mx

from zmlx import backend as _backend
from zmlx import config
from zmlx.backend import Backend
from zmlx.kernels.compact import compact

# "exact": bitwise equal to the stock op sequence; "close": within the accuracy rule
Fidelity = Literal["exact", "close"]


@functools.cache
def _csrc_file(name: str) -> str:
    return (resources.files(__package__) / "csrc" / name).read_text(encoding="utf-8")


def device_code(*names: str) -> str:
    """The text of these files under kernels/csrc/, in order, joined as they are: what a
    KernelDef's `header` or `body` holds (each file read once)."""
    return "".join(_csrc_file(name) for name in names)


def as_handed(text: str) -> str:
    """Device code as MLX gets it: compacted (zmlx.kernels.compact), or as written with
    ZMLX_KERNEL_COMMENTS=1. Each piece ends in a newline, so the pieces join as the whole."""
    return text if config.kernel_comments() else compact(text)


# Each backend's prelude: the macros of this module's docstring, before the kernel's own header
PRELUDE_HEADER: dict[Backend, str] = {
    backend: device_code(f"prelude_{backend}.h") for backend in ("cuda", "metal")
}
# MLX declares a Metal thread attribute only when the source names it, so the
# indices are named here, in the source, not in the header.
PRELUDE_SOURCE: dict[Backend, str] = {
    "cuda": (
        "const uint zmlx_tid = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "const uint zmlx_lid = threadIdx.x;\n"
        "const uint zmlx_gid = blockIdx.x;\n"
        "const uint zmlx_lane = threadIdx.x % 32;\n"
        "const uint zmlx_warp = threadIdx.x / 32;\n"
    ),
    "metal": (
        "const uint zmlx_tid = thread_position_in_grid.x;\n"
        "const uint zmlx_lid = thread_position_in_threadgroup.x;\n"
        "const uint zmlx_gid = threadgroup_position_in_grid.x;\n"
        "const uint zmlx_lane = thread_index_in_simdgroup;\n"
        "const uint zmlx_warp = simdgroup_index_in_threadgroup;\n"
    ),
}


def template_lines(template, type_names) -> list[str]:
    """The lines MLX puts at the top of a kernel for its template arguments (`constexpr`
    for ints and bools, `using` for dtypes, named through `type_names`), for the tools that
    build the same source outside MLX (Metal emulation, CUDA compile check)."""
    lines = []
    for name, value in template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {name} = {value};")
        else:
            lines.append(f"  using {name} = {type_names[value]};")
    return lines


@functools.lru_cache(maxsize=256)
def float_bits(value: float) -> int:
    """The float32 nearest `value` as the int with its bits (a template argument)."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def compiler_error(text: str, limit: int = 300) -> str:
    """The first compiler diagnostic in a build failure's text (the "error: ..." line of
    NVRTC, Metal's compiler or the emulation's g++, from "error:" on: the generated file's
    path says nothing), else its first line: what a fallback reason shows."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln:
            return ln[ln.index("error:") :][:limit]
    return lines[0][:limit] if lines else "no message"


class Plan(NamedTuple):
    backend: Backend
    path: Literal["kernel", "reference"]
    reason: str  # why the reference runs ("" when the kernel does)


class Launch(NamedTuple):
    """What one call hands to the kernel: its inputs and the geometry computed from their shapes."""

    inputs: list
    template: list
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list
    output_dtypes: list


def kernel_kwargs(spec: Launch, init_value: float | None = None) -> dict[str, Any]:
    """What a kernel call hands MLX for this Launch besides its inputs: the one definition
    that `KernelDef.run_kernel` and a prepared launch (zmlx.kernels.prepared) share."""
    kw: dict[str, Any] = dict(
        template=spec.template,
        grid=spec.grid,
        threadgroup=spec.threadgroup,
        output_shapes=spec.output_shapes,
        output_dtypes=spec.output_dtypes,
    )
    if init_value is not None:
        kw["init_value"] = init_value
    return kw


def outputs(outs: list) -> Any:
    """A kernel call's result: its one output, or a tuple of them."""
    return outs[0] if len(outs) == 1 else tuple(outs)


@dataclass(frozen=True, slots=True)
class Skip:
    """This call takes the reference, and why (its shapes or dtypes do not fit the kernel).
    Not a tuple, so that it is never mistaken for a kernel's outputs."""

    reason: str


@dataclass(frozen=True, eq=False)
class KernelDef:
    name: str
    reference: Callable
    fidelity: Fidelity = "exact"  # "exact": bitwise equal to reference; "close": within tolerance
    tolerance: float = 0.0  # "close": the self-check's rtol and atol against the reference
    # backends on which a "close" kernel is bitwise the reference all the same (its arithmetic
    # follows stock's kernels there): the self-check then demands bitwise equality
    exact_on: tuple[Backend, ...] = ()
    # the reference is stock's own op sequence (so the reference path, e.g. on the CPU, is
    # exact); False for a kernel whose reference is a float32 computation of another shape
    reference_is_stock: bool = True
    body: str | None = None
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    # launch(backend, *args, **kwargs) -> Launch, or Skip: why this call takes the reference
    launch: Callable[..., Launch | Skip] | None = None
    # example() -> (args, kwargs): small inputs for the pre-use check
    example: Callable[[], tuple[tuple, dict]] | None = None
    # variant_example(backend) -> (args, kwargs) or None: a call of another variant of the body
    # on that backend (moe_mlp's QMM on CUDA while its switch is on), checked too
    variant_example: Callable[[Backend], tuple[tuple, dict] | None] | None = None
    header: str = ""
    # backend -> "" (the kernel passed its self-check) or why it failed
    _status: dict[Backend, str] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        _DEFINED.add(self)

    def source(self, backend: Backend) -> tuple[str, str]:
        """(header, source) exactly as handed to mx.fast.<backend>_kernel: the prelude and
        the kernel's code, compacted (zmlx.kernels.compact; ZMLX_KERNEL_COMMENTS=1: as
        written)."""
        if self.body is None:
            raise ValueError(f"{self.name} has no device body")
        return as_handed(PRELUDE_HEADER[backend] + self.header), as_handed(
            PRELUDE_SOURCE[backend]
        ) + as_handed(self.body)

    def fidelity_on(self, backend: Backend) -> Fidelity:
        """ "exact" or "close" on this backend (the reference path is exact when the reference
        is stock's op sequence)."""
        if backend == "cpu":
            return "exact" if self.reference_is_stock else self.fidelity
        return "exact" if backend in self.exact_on else self.fidelity

    def plan(self, backend: Backend | None = None) -> Plan:
        backend = backend or _backend.current()
        if backend == "cpu":
            return Plan(backend, "reference", "custom kernels do not run on MLX's CPU backend")
        if self.body is None:
            return Plan(backend, "reference", f"no {backend} body for {self.name} yet")
        if backend not in self._status:
            self._status[backend] = self._check(backend)
        reason = self._status[backend]
        return Plan(backend, "reference" if reason else "kernel", reason)

    def _check(self, backend: Backend) -> str:
        """Build and run once on the example (and the variant's, where its launch takes it);
        '' if each matches the reference."""
        if self.example is None:
            return ""
        why = self._check_one(backend, *self.example())
        variant = None if why or self.variant_example is None else self.variant_example(backend)
        if variant is None:  # none on this backend, or its switch is off
            return why
        return self._check_one(backend, *variant, "its variant's example")

    def _check_one(self, backend: Backend, args, kwargs, what: str = "its own example") -> str:
        try:
            got = self.run_kernel(backend, *args, **kwargs)
            want = self.reference(*args, **kwargs)
            mx.eval(got, want)
        except config.ConfigError:  # the user's setting (ZMLX_KERNEL_COMMENTS), not the kernel
            raise
        except Exception as e:  # a build or launch failure: take the reference, say why
            return f"{self.name} {backend} kernel failed to build or run: {compiler_error(str(e))}"
        if isinstance(got, Skip):
            return f"{self.name} {backend} kernel does not take {what}: {got.reason}"
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        if self.fidelity_on(backend) == "exact" and not (
            len(got) == len(want) and all(mx.array_equal(a, b).item() for a, b in zip(got, want))
        ):
            return f"{self.name} {backend} kernel is not bitwise equal to the reference on {what}"
        if self.fidelity_on(backend) == "close" and not (
            len(got) == len(want)
            and all(
                mx.allclose(a, b, rtol=self.tolerance, atol=self.tolerance).item() for a, b in zip(got, want)
            )
        ):
            return f"{self.name} {backend} kernel is not within {self.tolerance:g} of the reference on {what}"
        return ""

    def run_kernel(self, backend: Backend, *args, init_value: float | None = None, **kwargs):
        """The fused kernel itself (no fallback): its output(s), or the launch's Skip when
        the shapes do not fit it."""
        if self.launch is None:
            raise ValueError(f"{self.name} has no launch")
        spec = self.launch(backend, *args, **kwargs)
        if isinstance(spec, Skip):
            return spec
        if RECORD is not None and backend == "cuda":
            RECORD(self, spec)
        return outputs(build(self, backend)(inputs=spec.inputs, **kernel_kwargs(spec, init_value)))

    def __call__(self, *args, **kwargs):
        """The kernel where it passed its self-check on this backend and its launch takes
        these arguments; the reference otherwise."""
        backend = _backend.current()
        # `_status` first: the hot path, once this backend's self-check has passed ("")
        if self._status.get(backend) == "" or self.plan(backend).path == "kernel":
            out = self.run_kernel(backend, *args, **kwargs)
            if not isinstance(out, Skip):
                return out
        return self.reference(*args, **kwargs)


# zmlx.kernels.ptx_cache's Recorder while it records the CUDA launches built (their sources,
# for MLX's PTX cache); None otherwise, which costs a kernel call one comparison.
RECORD: Callable[[KernelDef, Launch], None] | None = None


# Every KernelDef alive, so that an emulation (zmlx.kernels.metal_emu.emulated) can set aside
# and restore each one's self-check status on the backend it stands in for.
_DEFINED: weakref.WeakSet[KernelDef] = weakref.WeakSet()


def swap_statuses(backend: Backend, statuses: dict[KernelDef, str]) -> dict[KernelDef, str]:
    """Every live kernel's self-check status on `backend`, replaced by `statuses` (a kernel
    not in it has none: its next plan() checks it again). An emulation sets the real ones
    aside on its way in and puts them back on its way out."""
    old = {}
    for kernel in list(_DEFINED):
        if backend in kernel._status:
            old[kernel] = kernel._status.pop(backend)
    for kernel, status in statuses.items():
        kernel._status[backend] = status
    return old


# zmlx.kernels.metal_emu.emulated() puts its own `build` here while it runs (its Metal launches
# emulated) and the real one back after: a switch that costs the hot path nothing.
@functools.cache
def build(kernel: KernelDef, backend: Backend) -> Any:
    """The kernel's mx.fast.<backend>_kernel, built once per kernel and backend."""
    header, source = kernel.source(backend)
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    return make(
        name=f"zmlx_{kernel.name}",
        input_names=list(kernel.input_names),
        output_names=list(kernel.output_names),
        source=source,
        header=header,
    )
