"""zmlx's CUDA kernels compiled ahead into MLX's PTX cache, so a fresh process skips NVRTC.

MLX's CUDA JIT (jit_module.cpp, 0.32.x) looks for every kernel module it needs in its cache
folder (`$MLX_PTX_CACHE_DIR`, default `/tmp/mlx/<version>/ptx`) as `<module>.ptx` (a cubin
where NVRTC can target the device, as for Hopper) with `<module>.txt` (the kernel's name, a
tab, its mangled name) before it compiles; but it writes that file only for its own kernels:
`mx.fast.cuda_kernel` compiles zmlx's in every process again, seconds each. This module
  - rebuilds a launch's source exactly as MLX's `build_kernel` (custom_kernel.cpp) does
    (`cuda_source`) and names its module as MLX does (`module_name`: the kernel's name, then
    libstdc++'s `std::hash` of the source in hex, `std_hash`);
  - records the sources of the launches a process builds (`Recorder`, in a folder, one file
    each; `recording`, the hook in zmlx.kernels.core and zmlx.kernels.prepared);
  - compiles recorded sources with NVRTC and MLX's options into a cache folder
    (`compile_into`), the cubin written last, so MLX reads a whole entry or none.
A module MLX does not find is compiled by MLX as before, so an entry that is missing or
stale costs time, never results; an entry is only ever made from the source whose hash
names it, by the NVRTC that MLX itself loads (benchmarks/gpu/ptx_cache.py on the GPU machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from zmlx import config
from zmlx.kernels import core
from zmlx.kernels.core import KernelDef, Launch, template_lines

ARCH = "sm_90a"  # what MLX's JIT targets on the H100/H200 (compute capability 9.0, SASS)
NAMESPACE = "mlx::core::cu::"
# MLX's get_ptx_path: module names longer than this go into nested folders of that length
MAX_FILE_NAME = 245

# MLX's default_header (custom_kernel.cpp), before the kernel's own header
DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'

# MLX's dtype_to_cuda_type (the source's types) and get_type_string (the kernel name's)
CUDA_TYPE = {
    mx.bool_: "bool",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.float32: "float",
}
_NAME_TYPE = {**CUDA_TYPE, mx.float16: "float16_t", mx.bfloat16: "bfloat16_t"}

_MASK = (1 << 64) - 1
_MUL = (0xC6A4A793 << 32) + 0x5BD1E995
_SEED = 0xC70F6907


def std_hash(data: bytes) -> int:
    """libstdc++'s `std::hash<std::string>` on 64-bit Linux (`_Hash_bytes`, seed 0xc70f6907)."""

    def shift_mix(v: int) -> int:
        return v ^ (v >> 47)

    n = len(data)
    aligned = n & ~7
    h = (_SEED ^ (n * _MUL)) & _MASK
    for (word,) in struct.iter_unpack("<Q", data[:aligned]):
        h ^= (shift_mix((word * _MUL) & _MASK) * _MUL) & _MASK
        h = (h * _MUL) & _MASK
    if n & 7:
        h ^= int.from_bytes(data[aligned:], "little")
        h = (h * _MUL) & _MASK
    h = (shift_mix(h) * _MUL) & _MASK
    return shift_mix(h)


def kernel_name(kernel: KernelDef, template: list) -> str:
    """MLX's name for a launch's kernel: `custom_kernel_` + the name zmlx gives MLX + one
    `_value` per template argument (template_arguments_hash)."""
    parts = []
    for _, value in template:
        if isinstance(value, bool):
            parts.append("_t" if value else "_f")
        elif isinstance(value, int):
            parts.append(f"_{value}")
        else:
            parts.append("_" + _NAME_TYPE[value])
    return f"custom_kernel_zmlx_{kernel.name}" + "".join(parts)


def cuda_source(kernel: KernelDef, spec: Launch) -> str:
    """The whole source MLX's cuda_kernel builds for this launch (build_kernel): byte for byte,
    since its hash names the module."""
    header, body = kernel.source("cuda")
    params = []
    for n, a in zip(kernel.input_names, spec.inputs):
        params.append(f"    const {CUDA_TYPE[a.dtype]}* {n},\n")
        if a.ndim > 0:  # MLX passes these when the source names them
            for suffix, kind in (("shape", "Shape"), ("strides", "Strides"), ("ndim", "int")):
                if f"{n}_{suffix}" in body:
                    params.append(f"    const __grid_constant__ {kind} {n}_{suffix},\n")
    outs = [f"    {CUDA_TYPE[d]}* {n}" for n, d in zip(kernel.output_names, spec.output_dtypes)]
    consts = template_lines(spec.template, CUDA_TYPE)
    return (
        DEFAULT_HEADER
        + header
        + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        + f"__global__ void {kernel_name(kernel, spec.template)}(\n"
        + "".join(params)
        + ",\n".join(outs)
        + ") {\n"
        + "".join(line + "\n" for line in consts)
        + ("\n" if consts else "")
        + body
        + "\n}\n\n} // namespace mlx::core::cu\n"
    )


_NAME_IN_SOURCE = re.compile(r"__global__ void (custom_kernel_\w+)\(")


def module_name(source: str) -> str:
    """MLX's module name for a kernel source: `<kernel name>_<std::hash of the source, hex>`."""
    found = _NAME_IN_SOURCE.search(source)
    if found is None:
        raise ValueError("not a custom kernel's source (no `__global__ void custom_kernel_...(`)")
    return f"{found.group(1)}_{std_hash(source.encode()):x}"


def entry_path(cache_dir: Path, module: str) -> Path:
    """Where MLX looks for a module's cubin (get_ptx_path: long names split into folders)."""
    if len(module) <= MAX_FILE_NAME:
        return cache_dir / (module + ".ptx")
    path, offset = cache_dir, 0
    while len(module) - offset > MAX_FILE_NAME:
        path = path / module[offset : offset + MAX_FILE_NAME]
        offset += MAX_FILE_NAME
    return path / (module[offset:] + ".ptx")


class Recorder:
    """Writes the source of each distinct CUDA launch it is shown into `folder`, one file each
    (`<sha1 of the source>.cu`, written whole or not at all), for `compile_into`. A call costs
    a few µs (its key); after QUIET calls in a row that bring nothing new (a decode loop's
    steps, once its kernels are built) it stops recording, so that timed steps pay nothing."""

    QUIET = 2000

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.seen: set[tuple] = set()
        self.quiet = 0

    def __call__(self, kernel: KernelDef, spec: Launch) -> None:
        key = (
            kernel.name,
            tuple((a.dtype, a.ndim > 0) for a in spec.inputs),
            tuple((n, v if isinstance(v, int) else str(v)) for n, v in spec.template),
            tuple(spec.output_dtypes),
        )
        if key in self.seen:
            self.quiet += 1
            if self.quiet >= self.QUIET and core.RECORD is self:
                core.RECORD = None
            return
        self.quiet = 0
        self.seen.add(key)
        source = cuda_source(kernel, spec)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / (hashlib.sha1(source.encode()).hexdigest() + ".cu")
            if not path.exists():
                _write_whole(path, source.encode())
        except OSError as e:  # a folder it cannot write: say so once, record no more, run on
            warnings.warn(f"ZMLX_KERNEL_SOURCES: cannot record into {self.folder} ({e}); not recording")
            if core.RECORD is self:
                core.RECORD = None


@contextlib.contextmanager
def recording(folder: Path) -> Iterator[Recorder]:
    """Record the CUDA launches built while inside (core.RECORD), then stop."""
    before = core.RECORD
    core.RECORD = recorder = Recorder(folder)
    try:
        yield recorder
    finally:
        core.RECORD = before


def start_recording(folder: Path | None) -> None:
    """Record from now on into `folder` (config.kernel_sources_dir()); None: leave as is."""
    if folder is not None and not isinstance(core.RECORD, Recorder):
        core.RECORD = Recorder(folder)


def stop_recording() -> None:
    """Record no more (a recording process's timed part, where a call pays no recording)."""
    if isinstance(core.RECORD, Recorder):
        core.RECORD = None


def _write_whole(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Toolchain:
    """An NVRTC and what MLX's JIT hands it: its device headers (in memory, by include name)
    and its include paths (its bundled headers, their CCCL, the CUDA runtime headers)."""

    nvrtc: Path
    headers: dict[str, bytes]
    include_paths: tuple[Path, ...]

    def load(self) -> Any:
        import ctypes

        for builtins in sorted(self.nvrtc.parent.glob("libnvrtc-builtins.so*")):  # dlopened by name
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        return ctypes.CDLL(str(self.nvrtc))


def mlx_toolchain() -> Toolchain:
    """The NVRTC this process's MLX loaded (else the one its wheel's layout names), the device
    headers embedded in its libmlx.so and its include paths (jit_module.cpp's
    include_path_args): what MLX's own JIT would compile with here."""
    from zmlx.kernels.cuda_setup import embedded_headers

    lib = Path(mx.__file__).parent / "lib" / "libmlx.so"
    root = lib.parent.parent
    nvidia = root.parent / "nvidia" / "cu13"
    maps = Path("/proc/self/maps").read_text().splitlines()
    loaded = [ln.split()[-1] for ln in maps if "libnvrtc.so" in ln]
    nvrtc = Path(loaded[0]) if loaded else nvidia / "lib" / "libnvrtc.so.13"
    headers = embedded_headers(lib.read_bytes())
    paths = [p for p in (root / "include", root / "include" / "cccl") if p.exists()]
    cuda = nvidia / "include" if (nvidia / "include").exists() else config.cuda_home() / "include"
    return Toolchain(nvrtc, headers, (*paths, cuda))


def check_toolchain() -> Toolchain:
    """The developer machine's NVRTC and headers (zmlx.kernels.cuda_check's, from
    cuda_setup), the device headers handed in memory as MLX does."""
    from zmlx.kernels import cuda_check

    include = cuda_check.cache_dir() / "include"
    nvidia = cuda_check.cache_dir() / "nvidia" / "cu13"
    device = include / "mlx" / "backend" / "cuda" / "device"
    headers = {f"mlx/backend/cuda/device/{f.name}": f.read_bytes() for f in sorted(device.iterdir())}
    paths = (include, include / "cccl", nvidia / "include")
    return Toolchain(nvidia / "lib" / "libnvrtc.so.13", headers, paths)


def compile_into(sources: list[Path], cache_dir: Path, toolchain: Toolchain, jobs: int = 1) -> dict[str, str]:
    """Compile each recorded source into `cache_dir` (compile_one), `jobs` processes at once.
    Returns module name (or the file's name where it failed) -> "compiled", "there" or the
    error."""
    from concurrent.futures import ProcessPoolExecutor

    work = [(str(s), str(cache_dir), toolchain) for s in sources]
    if jobs <= 1:
        return dict(map(_compile_file, work))
    with ProcessPoolExecutor(jobs) as pool:
        return dict(pool.map(_compile_file, work))


def _compile_file(args: tuple[str, str, Toolchain]) -> tuple[str, str]:
    path, cache_dir, toolchain = args
    source = Path(path).read_text()
    try:
        module = module_name(source)
        if entry_path(Path(cache_dir), module).exists():
            return module, "there"
        compile_one(source, Path(cache_dir), toolchain)
        return module, "compiled"
    except Exception as e:  # reported per source; MLX compiles a missing entry itself
        return Path(path).name, f"failed: {str(e)[:300]}"


_LOADED: dict[Path, Any] = {}


def _loaded(toolchain: Toolchain) -> Any:
    if toolchain.nvrtc not in _LOADED:
        _LOADED[toolchain.nvrtc] = toolchain.load()
    return _LOADED[toolchain.nvrtc]


def compile_one(source: str, cache_dir: Path, toolchain: Toolchain) -> str:
    """Compile one recorded source as MLX's JIT would and write its entry into `cache_dir`:
    `<module>.txt` first, then `<module>.cu` (as MLX writes its own), the cubin last. Returns
    the module's name; an entry already there is left as it is."""
    module = module_name(source)
    ptx = entry_path(cache_dir, module)
    if ptx.exists():
        return module
    name = NAMESPACE + module.rsplit("_", 1)[0]
    cubin, mangled = compile_source(source, module, [name], toolchain)
    ptx.parent.mkdir(parents=True, exist_ok=True)
    _write_whole(ptx.with_suffix(".txt"), f"{name}\t{mangled[name]}\n".encode())
    _write_whole(ptx.with_suffix(".cu"), source.encode())
    _write_whole(ptx, cubin)
    return module


def compile_source(source: str, module: str, names: list[str], toolchain: Toolchain) -> tuple[bytes, dict]:
    """NVRTC's cubin of `source` as MLX's JIT compiles a module (its program name, in-memory
    headers, name expressions and options), and each name's mangled name."""
    import ctypes

    nvrtc, headers = _loaded(toolchain), toolchain.headers
    options = nvrtc_options(list(toolchain.include_paths))
    prog = ctypes.c_void_p()
    keys = list(headers)
    n = len(keys)
    c_sources = (ctypes.c_char_p * n)(*[headers[k] for k in keys])
    c_names = (ctypes.c_char_p * n)(*[k.encode() for k in keys])
    file = f"{module}.cu".encode()
    _ok(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), file, n, c_sources, c_names))
    try:
        for name in names:
            _ok(nvrtc, nvrtc.nvrtcAddNameExpression(prog, name.encode()))
        arr = (ctypes.c_char_p * len(options))(*options)
        if nvrtc.nvrtcCompileProgram(prog, len(options), arr) != 0:
            raise RuntimeError(f"{module} does not compile: " + _log(nvrtc, prog)[:2000])
        mangled = {}
        for name in names:
            lowered = ctypes.c_char_p()
            _ok(nvrtc, nvrtc.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)))
            assert lowered.value is not None
            mangled[name] = lowered.value.decode()
        size = ctypes.c_size_t()
        _ok(nvrtc, nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _ok(nvrtc, nvrtc.nvrtcGetCUBIN(prog, cubin))
        return cubin.raw[: size.value], mangled
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def same_as_mlx(cache_dir: Path, toolchain: Toolchain, limit: int = 8) -> dict[str, bool]:
    """For up to `limit` of MLX's own entries in its cache (it writes their source and kernel
    names beside the cubin): whether compiling that source here gives MLX's cubin byte for
    byte, the proof that this toolchain and these options are MLX's JIT's."""
    out: dict[str, bool] = {}
    for cu in sorted(cache_dir.glob("*.cu")):
        if cu.name.startswith("custom_kernel_zmlx_") or len(out) >= limit:
            continue
        txt, ptx = cu.with_suffix(".txt"), cu.with_suffix(".ptx")
        if not (txt.exists() and ptx.exists()):
            continue
        names = [ln.split("\t")[0] for ln in txt.read_text().splitlines() if "\t" in ln]
        cubin, mangled = compile_source(cu.read_text(), cu.stem, names, toolchain)
        want = dict(ln.split("\t", 1) for ln in txt.read_text().splitlines() if "\t" in ln)
        out[cu.stem] = cubin == ptx.read_bytes() and mangled == want
    return out


def nvrtc_options(include_paths: list[Path]) -> list[bytes]:
    """MLX's NVRTC options for a Hopper device (jit_module.cpp's compile)."""
    return [
        b"--device-as-default-execution-space",
        f"--gpu-architecture={ARCH}".encode(),
        *(f"--include-path={p}".encode() for p in include_paths),
    ]


def _log(nvrtc: Any, prog: Any) -> str:
    import ctypes

    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    return log.value.decode(errors="replace")


def _ok(nvrtc: Any, status: int) -> None:
    if status != 0:
        import ctypes

        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC: {nvrtc.nvrtcGetErrorString(status).decode()}")
