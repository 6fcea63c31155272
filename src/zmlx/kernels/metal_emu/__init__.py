"""Run a KernelDef's Metal body on the CPU: compiled with g++ against metal_emu.h.

The body gets exactly the header and source zmlx hands to `mx.fast.metal_kernel`
(`KernelDef.source("metal")`), inside a function whose signature mirrors the one MLX
generates (inputs as `const device T*`, outputs as `device T*`, template arguments as
constants, thread attributes by their Metal names). Outputs start poisoned (all bytes 0xFF:
NaN for floats) so an unwritten element shows.

Strict on purpose, so that a bug a GPU would show fails here on every run:
- order: each GPU thread is a fiber of one OS thread; the threadgroups run in an order drawn
  from `seed` (never the natural one), and a group's threads in a reshuffled order between
  every two synchronization points. A fixed default seed keeps CI reproducible.
- threadgroup memory: filled with 0xFF bytes (NaN, or -1 for ints) at each group's start;
  a read of an element no thread of the group has written, or an index out of bounds, stops
  the run.
- races: every threadgroup access is checked against a shadow word (barrier epoch and thread
  of the last write and reads): two threads touching one element, one writing, with no
  threadgroup_barrier between them stop the run with the array, the index and both threads.
  Deterministic: it depends on what the threads touch, not on when.
- rounding: bfloat16_t and half round after every operation (bf16 op bf16 -> bf16, bf16 op
  float -> float, as MLX's Metal bf16.h); float never contracts into an FMA.
- convergence: every live lane of a simdgroup must reach a simd_* op at the same call (a
  reduction in one branch of an if, or after some lanes returned, stops the run), and every
  thread of a group the same threadgroup_barrier.

What it cannot see: device-memory races (two threads writing one output element, a read of
another group's output: the random group order exposes only some); the GPU's own simd_sum
order (lanes are summed in order) and its float math (exp, rsqrt are the C library's, not
Metal's fast-math versions); memory-ordering bugs finer than a barrier interval; anything
about performance.

Limits (documented subset, see metal_emu.h): 1-D threadgroup arrays declared in the kernel
body (no threadgroup pointers), 32-wide simdgroups, float simd_* reductions, no atomics. An
input's `NAME_shape` is passed when the body names it, as MLX does; `_strides` and `_ndim`
are not emulated.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from zmlx.kernels.core import Skip, as_handed, template_lines

HERE = Path(__file__).resolve().parent

_CTYPES = {
    mx.float32: "float",
    mx.bfloat16: "bfloat16_t",
    mx.float16: "half",
    mx.uint32: "uint",
    mx.int32: "int",
    mx.uint8: "uint8_t",
    mx.bool_: "bool",
    mx.int64: "int64_t",
}
_ATTRS = {
    "thread_position_in_grid": "zmlx_emu::cur->tpig",
    "thread_position_in_threadgroup": "zmlx_emu::cur->tpitg",
    "threadgroup_position_in_grid": "zmlx_emu::cur->tgpig",
    "threads_per_threadgroup": "zmlx_emu::cur->tptg",
    "thread_index_in_simdgroup": "zmlx_emu::cur->lane",
    "simdgroup_index_in_threadgroup": "zmlx_emu::cur->simd",
}
# a 1-D threadgroup array declaration: `threadgroup T name[N];` (or through ZMLX_SHARED)
_SHARED = re.compile(
    r"\b(?:threadgroup|ZMLX_SHARED)\s+([A-Za-z_][\w:]*)\s+([A-Za-z_]\w*)\s*\[([^\[\]]+)\]\s*;"
)
# a failed check of the emulation (metal_emu.h: a race, a divergent simd op, ...)
_CHECK_FAILED = 4

_MAIN = r"""
#undef device
#undef constant
#undef thread
#undef threadgroup
#undef kernel
static std::vector<char> zmlx_read(const char* path) {
  FILE* f = std::fopen(path, "rb"); std::vector<char> buf;
  if (!f) { std::perror(path); std::exit(3); }
  std::fseek(f, 0, SEEK_END); long n = std::ftell(f); std::fseek(f, 0, SEEK_SET);
  buf.resize(n); if (n && std::fread(buf.data(), 1, n, f) != (size_t)n) std::exit(3); std::fclose(f);
  return buf;
}
%(buffers)s
static void zmlx_entry() { zmlx_kernel(%(call)s); }
int main(int argc, char** argv) {
  (void)argc;
%(read)s
  const uint64_t seed = std::strtoull(argv[%(seed_arg)d], nullptr, 10);
  zmlx_emu::run_grid({%(gx)d, %(gy)d, %(gz)d}, {%(tx)d, %(ty)d, %(tz)d}, zmlx_entry, seed);
%(write)s
  return 0;
}
"""


class EmulationError(RuntimeError):
    """The body is outside the emulated subset or failed to build; the message says how."""


def _shared_arrays(code: str) -> str:
    """Threadgroup array declarations as zmlx_emu::Shared objects (checked accesses, poisoned at
    each group's start); one static object per declaration, shared by the group's fibers."""
    return _SHARED.sub(lambda m: f'static zmlx_emu::Shared<{m[1]}, ({m[3]})> {m[2]}{{"{m[2]}"}};', code)


def _translation_unit(kernel, spec) -> str:
    header, source = kernel.source("metal")
    body_at = len(source) - len(as_handed(kernel.body))  # the prelude, then the body (line numbers)
    source = f'{source[:body_at]}#line 1 "{kernel.name} body"\n{source[body_at:]}'
    params, call, buffers, read, write = [], [], [], [], []
    for i, (name, arr) in enumerate(zip(kernel.input_names, spec.inputs)):
        ctype = _CTYPES[arr.dtype]
        params.append(f"const device {ctype}* {name}")
        buffers.append(f"static std::vector<char> in{i};")
        read.append(f"  in{i} = zmlx_read(argv[{i + 1}]);")
        call.append(f"reinterpret_cast<const {ctype}*>(in{i}.data())")
        if f"{name}_shape" in source and arr.ndim > 0:  # as MLX adds it: a constant int buffer
            params.append(f"const constant int* {name}_shape")
            buffers.append(f"static const int shape{i}[] = {{{', '.join(str(d) for d in arr.shape)}}};")
            call.append(f"shape{i}")
    n_in = len(spec.inputs)
    outputs = zip(kernel.output_names, spec.output_shapes, spec.output_dtypes)
    for j, (name, shape, dtype) in enumerate(outputs):
        ctype = _CTYPES[dtype]
        nbytes = math.prod(shape) * dtype.size
        params.append(f"device {ctype}* {name}")
        buffers.append(f"static std::vector<char> out{j}({nbytes}, char(0xff));")
        call.append(f"reinterpret_cast<{ctype}*>(out{j}.data())")
        write.append(
            f'  {{ FILE* f = std::fopen(argv[{n_in + j + 1}], "wb"); '
            f"std::fwrite(out{j}.data(), 1, out{j}.size(), f); std::fclose(f); }}"
        )
    consts = template_lines(spec.template, _CTYPES)
    attrs = "\n".join(f"#define {k} ({v})" for k, v in _ATTRS.items())
    gx, gy, gz = spec.grid
    tx, ty, tz = spec.threadgroup
    return (
        f'#include "metal_emu.h"\n#line 1 "{kernel.name} header"\n{_shared_arrays(header)}\n'
        f'#line 1 "{kernel.name} kernel"\n{attrs}\n'
        f"void zmlx_kernel({', '.join(params)}) {{\n"
        + "\n".join(consts)
        + f"\n{_shared_arrays(source)}\n}}\n"
        + _MAIN
        % dict(
            buffers="\n".join(buffers),
            read="\n".join(read),
            write="\n".join(write),
            call=", ".join(call),
            seed_arg=n_in + len(spec.output_shapes) + 1,
            gx=gx,
            gy=gy,
            gz=gz,
            tx=tx,
            ty=ty,
            tz=tz,
        )
    )


def _compile(tu: str, workdir: Path) -> Path:
    headers = "".join(p.read_text() for p in sorted(HERE.glob("*.h")))  # a changed header rebuilds
    key = hashlib.sha256((headers + tu).encode()).hexdigest()[:16]
    exe = workdir / f"k_{key}"
    if exe.exists():
        return exe
    src = workdir / f"k_{key}.cpp"
    src.write_text(tu)
    cmd = ["g++", "-std=c++20", "-O1", "-ffp-contract=off", f"-I{HERE}", str(src), "-o", str(exe)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        first = next((line for line in p.stderr.splitlines() if "error" in line), p.stderr[:300])
        raise EmulationError(
            f"the Metal body does not build against metal_emu.h (outside the subset?): {first}"
        )
    return exe


def available() -> bool:
    return shutil.which("g++") is not None


def run(kernel, *args, workdir: str | Path | None = None, seed: int = 0, **kwargs):
    """The Metal kernel's outputs for these inputs, computed on the CPU; `seed` draws the order
    of the threadgroups and of the threads between synchronization points (the same seed, the
    same order: a fixed default keeps CI reproducible). A failed check (a race, a divergent
    simd op, a read of unwritten threadgroup memory) raises EmulationError with its message."""
    spec = kernel.launch("metal", *args, **kwargs)
    if isinstance(spec, Skip):
        raise EmulationError(f"{kernel.name} does not take these inputs: {spec.reason}")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="zmlx-metal-emu-"))
    results = execute(kernel, spec, compile_launch(kernel, spec, workdir), workdir, seed)
    return results[0] if len(results) == 1 else tuple(results)


def compile_launch(kernel, spec, workdir: Path) -> Path:
    """The executable that runs this Launch of the kernel's Metal body (built in `workdir`
    once per kernel, template, geometry, shapes and dtypes; kept there for the next time)."""
    return _compile(_translation_unit(kernel, spec), workdir)


def execute(kernel, spec, exe: Path, workdir: Path, seed: int = 0) -> list:
    """Run one launch: `spec`'s inputs through `exe` (compile_launch's), its outputs as arrays."""
    paths = []
    for i, arr in enumerate(spec.inputs):
        p = workdir / f"in{i}.bin"
        data = arr.view(mx.uint16) if arr.dtype in (mx.bfloat16, mx.float16) else arr
        np.asarray(mx.contiguous(data)).tofile(p)
        paths.append(str(p))
    outs = [str(workdir / f"out{j}.bin") for j in range(len(spec.output_shapes))]
    proc = subprocess.run([str(exe), *paths, *outs, str(seed)], capture_output=True, text=True, timeout=300)
    if proc.returncode == _CHECK_FAILED:
        raise EmulationError(f"{kernel.name}: {proc.stderr.strip().removeprefix('zmlx-emu: ')[:600]}")
    if proc.returncode != 0:
        raise EmulationError(f"emulated kernel exited {proc.returncode}: {proc.stderr[:300]}")
    results = []
    for path, shape, dtype in zip(outs, spec.output_shapes, spec.output_dtypes):
        if dtype in (mx.bfloat16, mx.float16):
            raw = np.fromfile(path, dtype=np.uint16).reshape(shape)
            results.append(mx.array(raw).view(dtype))
        else:
            np_dtype = np.dtype(str(dtype).split(".")[-1].replace("bool_", "bool"))
            results.append(mx.array(np.fromfile(path, dtype=np_dtype).reshape(shape)))
    return results


# A whole model with its kernels' Metal bodies emulated (after the names it uses from here).
from zmlx.kernels.metal_emu.dispatch import emulated as emulated  # noqa: E402
