"""Compile a kernel's CUDA body with NVRTC, as MLX's `cuda_kernel` would, without a GPU.

MLX builds a custom kernel's source around the body (its default header, zmlx's header,
`namespace mlx::core::cu`, a `__global__` signature with one pointer per input and
output, one `constexpr`/`using` line per template argument) and compiles it with NVRTC
for the device. `compile_launch` builds the same source (ptx_cache.cuda_source) for one `Launch` and compiles
it to PTX here, so a CUDA body that does not compile fails on the developer machine
instead of on the GPU machine (where the kernel would fall back to its reference).

Needs NVRTC, the CUDA runtime headers and MLX's CUDA headers for the installed MLX version
in `cache_dir()`, which `python -m zmlx.kernels.cuda_setup` fills from PyPI (CI runs it);
`available()` says whether they are there. Compile only: nothing runs, no numbers are
checked (the `cuda` tests do that on the GPU).
"""

from __future__ import annotations

import ctypes
import functools
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from zmlx.kernels import ptx_cache
from zmlx.kernels.core import KernelDef, Launch
from zmlx.kernels.ptx_cache import cuda_source

ARCH = ptx_cache.ARCH
STAMP = "setup.json"  # written last by cuda_setup: the cache is complete
SETUP = "python -m zmlx.kernels.cuda_setup"
# The reason off Linux: a platform's skip, so it names no compiler (see tests/conftest.py)
UNSUPPORTED = "the CUDA compile check runs on Linux only (PyPI has the CUDA compiler for Linux)"


class CudaCompileError(RuntimeError):
    """NVRTC rejected the source; the message holds its log."""


def supported() -> bool:
    return sys.platform == "linux"


def cache_dir() -> Path:
    """Where cuda_setup puts NVRTC and the headers: one folder per MLX version, since MLX's
    headers must be those of the MLX that runs the kernels."""
    return Path.home() / ".cache" / "zmlx" / "cuda-check" / f"mlx-{version('mlx')}"


def _include() -> Path:
    return cache_dir() / "include"  # MLX's include/ (cccl, cute, cutlass, mlx) + its device headers


def _nvidia_dir() -> Path:
    return cache_dir() / "nvidia" / "cu13"


@functools.cache
def _nvrtc():
    base = _nvidia_dir()
    if not (cache_dir() / STAMP).exists():
        return None
    try:  # NVRTC dlopens its builtins by name: load them first, globally
        for builtins in sorted((base / "lib").glob("libnvrtc-builtins.so.*")):
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        return ctypes.CDLL(str(base / "lib" / "libnvrtc.so.13"))
    except OSError:
        return None


def available() -> bool:
    return (
        _nvrtc() is not None
        and (_nvidia_dir() / "include" / "cuda_bf16.h").exists()
        and (_include() / "mlx" / "backend" / "cuda" / "device" / "utils.cuh").exists()
    )


def compile_launch(kernel: KernelDef, spec: Launch, *, resources: bool = False) -> str:
    """Compile the kernel's CUDA source for this launch; CudaCompileError with NVRTC's log
    if it does not compile. `resources`: return ptxas's report (registers per thread, spill
    stores and loads, stack frame), else ''."""
    lib = _nvrtc()
    if lib is None or not available():
        raise CudaCompileError(f"NVRTC or the CUDA headers are missing: run {SETUP}")
    src = cuda_source(kernel, spec).encode()
    prog = ctypes.c_void_p()
    _ok(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src, f"{kernel.name}.cu".encode(), 0, None, None))
    # MLX's include path order (jit_module.cpp): its bundled headers, their cccl, the CUDA headers
    include = _include()
    opts = [
        b"--device-as-default-execution-space",
        f"--gpu-architecture={ARCH}".encode(),
        f"--include-path={include}".encode(),
        f"--include-path={include / 'cccl'}".encode(),
        f"--include-path={_nvidia_dir() / 'include'}".encode(),
    ]
    # Precompiled headers, one per kernel name (its header is the same in every launch): they spare
    # re-parsing MLX's and CUDA's headers for each launch of a kernel; the compiled code is the same.
    opts += [b"--pch", f"--pch-dir={_pch_dir().name}".encode()]
    if resources:
        opts.append(b"--ptxas-options=--verbose")
    arr = (ctypes.c_char_p * len(opts))(*opts)
    try:
        status = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if status != 0:
            errors = [ln for ln in _log(lib, prog) if "error" in ln]
            raise CudaCompileError(f"{kernel.name} does not compile for {ARCH}:\n" + "\n".join(errors[:20]))
        if not resources:
            return ""
        return "\n".join(
            ln
            for ln in _log(lib, prog)
            if "ptxas" in ln or "registers" in ln or "spill" in ln or "stack" in ln
        )
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@functools.cache
def _pch_dir() -> tempfile.TemporaryDirectory:
    """NVRTC's precompiled headers, for this process (the folder goes when the process exits)."""
    return tempfile.TemporaryDirectory(prefix="zmlx-nvrtc-pch-")


def _log(lib, prog) -> list[str]:
    """NVRTC's log of a compiled program, line by line."""
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    return log.value.decode(errors="replace").splitlines()


def _ok(lib, status: int) -> None:
    if status != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise CudaCompileError(f"NVRTC: {lib.nvrtcGetErrorString(status).decode()}")
