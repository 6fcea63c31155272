"""Which MLX backend runs the default device: "metal", "cuda" or "cpu"."""

from __future__ import annotations

import functools
from typing import Literal

import mlx.core as mx

Backend = Literal["metal", "cuda", "cpu"]
BACKENDS: tuple[Backend, ...] = ("metal", "cuda", "cpu")


_GPU0, _CPU0 = mx.Device(mx.gpu), mx.Device(mx.cpu)

# The backend zmlx's dispatch sees while zmlx.kernels.metal_emu.emulated() runs that backend's
# bodies on the CPU (MLX itself still computes on its CPU); None otherwise.
_emulated: Backend | None = None


def current() -> Backend:
    """The backend of MLX's default device (or the emulated one, see `emulate`).

    A GPU default device is Metal on Apple silicon and CUDA elsewhere; a CPU
    default device (including a GPU build forced onto the CPU) runs the
    reference paths. Called on every kernel dispatch, so it stays cheap: it compares
    devices, which is cheaper than reading and comparing the device type (a nanobind
    enum comparison; benchmarks/NOTEBOOK.md, facts).
    """
    if _emulated is not None:
        return _emulated
    device = mx.default_device()
    if device == _GPU0:
        return _gpu_backend()
    if device == _CPU0 or device.type != mx.DeviceType.gpu:
        return "cpu"
    return _gpu_backend()


@functools.cache
def _gpu_backend() -> Backend:
    # Which GPU backend MLX was built with does not change within a process.
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def emulate(backend: Backend | None) -> None:
    """Make current() answer `backend`, whose kernel bodies an emulation runs on the CPU
    (zmlx.kernels.metal_emu.emulated sets and clears it), or MLX's own backend again (None)."""
    global _emulated
    _emulated = backend


def emulated() -> Backend | None:
    """The backend an emulation stands in for now, or None."""
    return _emulated


def recorded() -> str:
    """The backend as a record (a ledger line, a capsule) names it: current(), or e.g.
    "metal-emulated" while an emulation runs, so that its records never count as the real
    backend's (a preset's evidence, a speed)."""
    return f"{_emulated}-emulated" if _emulated is not None else current()


def device_name() -> str:
    """A human-readable name of the device that runs the default stream (while an emulation
    runs, the CPU it runs on, named as such)."""
    if _emulated is not None:
        import platform

        return f"{recorded()} on cpu ({platform.machine()}, {platform.processor() or 'unknown'})"
    backend = current()
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        name = info.get("device_name") or info.get("architecture")
    except Exception:  # device_info is optional across MLX versions and backends
        name = None
    if backend == "cpu":
        import platform

        return f"cpu ({platform.machine()}, {platform.processor() or 'unknown'})"
    return f"{backend} ({name or 'unknown device'})"
