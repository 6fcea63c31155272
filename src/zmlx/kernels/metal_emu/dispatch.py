"""A whole model on the CPU with its kernels' Metal bodies emulated.

    from zmlx.kernels import metal_emu

    with metal_emu.emulated():
        zmlx.patch(model)
        logits = model(tokens)  # each fused kernel: its Metal body, emulated

Inside the context zmlx's dispatch sees the backend as "metal" (zmlx.backend.current()):
patterns apply as on a Mac, each KernelDef passes its self-check on its example before its
first use (KernelDef.plan), and every launch, plain or prepared (through core.build, which
the context replaces), runs the Metal body through the emulation (metal_emu.run's: g++
against metal_emu.h) instead of mx.fast.metal_kernel, its outputs handed back as mx.arrays.
MLX itself computes everything else on its CPU. What it measures is how the Metal bodies
compute, never how fast: records made inside name the backend "metal-emulated"
(zmlx.backend.recorded), not "metal".

On the way out everything is as before: the backend, core.build, and every kernel's
Metal self-check status (set aside on the way in, so that no status from before, e.g. MLX's
"No Metal back-end", and none from the emulation crosses the boundary). A launch prepared
inside and called after it raises EmulationError.

Cost: a g++ build per kernel and launch shape (seconds, once per context), then one process
per launch whose GPU threads run as fibers (milliseconds each): enough for the accuracy rule
on a tiny model, not for a large one.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

from zmlx import backend as _backend
from zmlx.kernels import core
from zmlx.kernels import metal_emu as _emu
from zmlx.kernels.core import KernelDef, Launch


class _Emulation:
    """One context's state: its work directory and the executables built in it."""

    def __init__(self, workdir: Path, seed: int):
        self.workdir, self.seed, self.active = workdir, seed, True
        self.exes: dict[tuple, Path] = {}
        self.launches = 0

    def build(self, real_build):
        """core.build while the emulation runs: the emulated launch for "metal" (one per
        kernel), `real_build` for any other backend."""
        launchers: dict[KernelDef, _Launcher] = {}

        def build(kernel: KernelDef, backend: _backend.Backend) -> Any:
            if backend != "metal":
                return real_build(kernel, backend)
            if kernel not in launchers:
                launchers[kernel] = _Launcher(kernel, self)
            return launchers[kernel]

        return build


class _Launcher:
    """One kernel's emulated Metal launches, called as MLX's built kernel is (core.kernel_kwargs)."""

    __slots__ = ("kernel", "emulation")

    def __init__(self, kernel: KernelDef, emulation: _Emulation):
        self.kernel, self.emulation = kernel, emulation

    def __call__(
        self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None
    ) -> list:
        emu = self.emulation
        if not emu.active:
            raise _emu.EmulationError(
                f"{self.kernel.name}: a launch prepared under metal_emu.emulated() called after it"
            )
        if init_value is not None:
            raise _emu.EmulationError(f"{self.kernel.name}: init_value is not emulated")
        spec = Launch(
            list(inputs), list(template), grid, threadgroup, list(output_shapes), list(output_dtypes)
        )
        # what the translation unit depends on: the body (per kernel), template, geometry, shapes
        key = (
            self.kernel,
            tuple(spec.template),
            tuple(grid),
            tuple(threadgroup),
            tuple((a.shape, a.dtype) for a in spec.inputs),
            tuple(tuple(s) for s in spec.output_shapes),
            tuple(spec.output_dtypes),
        )
        exe = emu.exes.get(key)
        if exe is None:
            exe = emu.exes[key] = _emu.compile_launch(self.kernel, spec, emu.workdir)
        emu.launches += 1
        return _emu.execute(self.kernel, spec, exe, emu.workdir, emu.seed)


def refusal() -> str | None:
    """Why the emulation cannot run here (one line), or None."""
    if _backend.emulated() is not None:
        return "the Metal emulation is already running (one context at a time)"
    if (here := _backend.current()) != "cpu":
        return f"the Metal emulation runs on MLX's CPU backend (this is {here})"
    if not _emu.available():
        return "the Metal emulation needs g++ (it compiles each Metal body with it), and g++ is not on PATH"
    return None


@contextlib.contextmanager
def emulated(seed: int = 0) -> Iterator[Any]:
    """Run every kernel's Metal body through the emulation until the context ends (see the
    module's docstring). `seed`: the order of threadgroups and threads (metal_emu.run's).
    EmulationError, with refusal()'s line, where it cannot run. Yields the state, whose
    `launches` counts the emulated launches."""
    if (why := refusal()) is not None:
        raise _emu.EmulationError(why)
    with tempfile.TemporaryDirectory(prefix="zmlx-metal-emu-") as tmp:
        emulation = _Emulation(Path(tmp), seed)
        real_build = core.build
        real_statuses = core.swap_statuses("metal", {})
        core.build = emulation.build(real_build)
        _backend.emulate("metal")
        try:
            yield emulation
        finally:
            _backend.emulate(None)
            core.build = real_build
            core.swap_statuses("metal", real_statuses)
            emulation.active = False
