"""Run a KernelDef's Metal body on the CPU: compiled with g++ against metal_emu.h.

The body gets exactly the header and source zmlx hands to `mx.fast.metal_kernel`
(`KernelDef.source("metal")`), inside a function whose signature mirrors the one MLX
generates (inputs as `const device T*`, outputs as `device T*`, template arguments as
constants, thread attributes by their Metal names). Each GPU thread is a std::thread;
outputs start poisoned (all bytes 0xFF: NaN for floats) so an unwritten element shows.

Limits (documented subset, see metal_emu.h): threadgroup *arrays* only (no threadgroup
pointers), 32-wide simdgroups, float simd_* reductions, no atomics. An input's `NAME_shape`
is passed when the body names it, as MLX does; `_strides` and `_ndim` are not emulated.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from zmlx.kernels._core import template_lines

HERE = Path(__file__).resolve().parent

_CTYPES = {
    mx.float32: "float", mx.bfloat16: "bfloat16_t", mx.float16: "half", mx.uint32: "uint",
    mx.int32: "int", mx.uint8: "uint8_t", mx.bool_: "bool", mx.int64: "int64_t",
}
_ATTRS = {
    "thread_position_in_grid": "zmlx_emu::ctx.tpig",
    "thread_position_in_threadgroup": "zmlx_emu::ctx.tpitg",
    "threadgroup_position_in_grid": "zmlx_emu::ctx.tgpig",
    "threads_per_threadgroup": "zmlx_emu::ctx.tptg",
    "thread_index_in_simdgroup": "zmlx_emu::ctx.lane",
    "simdgroup_index_in_threadgroup": "zmlx_emu::ctx.simd",
}

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
int main(int argc, char** argv) {
  (void)argc;
%(read)s
  const uint gx = %(gx)d, gy = %(gy)d, gz = %(gz)d, tx = %(tx)d, ty = %(ty)d, tz = %(tz)d;
  for (uint bz = 0; bz * tz < gz; ++bz)
  for (uint by = 0; by * ty < gy; ++by)
  for (uint bx = 0; bx * tx < gx; ++bx) {
    std::vector<uint3> ids;
    for (uint z = 0; z < tz; ++z) for (uint y = 0; y < ty; ++y) for (uint x = 0; x < tx; ++x)
      if (bx * tx + x < gx && by * ty + y < gy && bz * tz + z < gz) ids.push_back({x, y, z});
    const uint n = ids.size();
    std::barrier<> group(n);
    std::vector<std::unique_ptr<std::barrier<>>> simd;
    std::vector<float> slots(((n + 31) / 32) * 32, 0.0f);
    for (uint s = 0; s * 32 < n; ++s) simd.emplace_back(new std::barrier<>(std::min<uint>(32, n - s * 32)));
    std::vector<std::thread> threads;
    for (uint i = 0; i < n; ++i) threads.emplace_back([&, i] {
      auto& c = zmlx_emu::ctx;
      c.tpitg = ids[i]; c.tgpig = {bx, by, bz}; c.tptg = {tx, ty, tz};
      c.tpig = {bx * tx + ids[i].x, by * ty + ids[i].y, bz * tz + ids[i].z};
      const uint linear = ids[i].x + ids[i].y * tx + ids[i].z * tx * ty;
      c.lane = linear %% 32; c.simd = linear / 32;
      c.group_barrier = &group; c.simd_barrier = simd[c.simd].get(); c.simd_slots = &slots[c.simd * 32];
      zmlx_kernel(%(call)s);
    });
    for (auto& t : threads) t.join();
  }
%(write)s
  return 0;
}
"""


class EmulationError(RuntimeError):
    """The body is outside the emulated subset or failed to build; the message says how."""


def _translation_unit(kernel, spec) -> str:
    header, source = kernel.source("metal")
    params, call, read, write = [], [], [], []
    for i, (name, arr) in enumerate(zip(kernel.input_names, spec.inputs)):
        ctype = _CTYPES[arr.dtype]
        params.append(f"const device {ctype}* {name}")
        read.append(f"  auto in{i} = zmlx_read(argv[{i + 1}]);")
        call.append(f"reinterpret_cast<const {ctype}*>(in{i}.data())")
        if f"{name}_shape" in source and arr.ndim > 0:  # as MLX adds it: a constant int buffer
            params.append(f"const constant int* {name}_shape")
            read.append(f"  static const int shape{i}[] = {{{', '.join(str(d) for d in arr.shape)}}};")
            call.append(f"shape{i}")
    n_in = len(spec.inputs)
    outputs = zip(kernel.output_names, spec.output_shapes, spec.output_dtypes)
    for j, (name, shape, dtype) in enumerate(outputs):
        ctype = _CTYPES[dtype]
        nbytes = math.prod(shape) * dtype.size
        params.append(f"device {ctype}* {name}")
        read.append(f"  std::vector<char> out{j}({nbytes}, char(0xff));")
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
        f'#include "metal_emu.h"\n{header}\n{attrs}\n'
        f"void zmlx_kernel({', '.join(params)}) {{\n" + "\n".join(consts) + f"\n{source}\n}}\n"
        + _MAIN % dict(read="\n".join(read), write="\n".join(write), call=", ".join(call),
                       gx=gx, gy=gy, gz=gz, tx=tx, ty=ty, tz=tz)
    )


def _compile(tu: str, workdir: Path) -> Path:
    key = hashlib.sha256(tu.encode()).hexdigest()[:16]
    exe = workdir / f"k_{key}"
    if exe.exists():
        return exe
    src = workdir / f"k_{key}.cpp"
    src.write_text(tu)
    cmd = ["g++", "-std=c++20", "-O1", "-pthread", "-ffp-contract=off", f"-I{HERE}", str(src), "-o", str(exe)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        first = next((line for line in p.stderr.splitlines() if "error" in line), p.stderr[:300])
        raise EmulationError(
            f"the Metal body does not build against metal_emu.h (outside the subset?): {first}"
        )
    return exe


def available() -> bool:
    return shutil.which("g++") is not None


def run(kernel, *args, workdir: str | Path | None = None, **kwargs):
    """The Metal kernel's outputs for these inputs, computed on the CPU."""
    spec = kernel.launch("metal", *args, **kwargs)
    if isinstance(spec, str):
        raise EmulationError(f"{kernel.name} does not take these inputs: {spec}")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="zmlx-metal-emu-"))
    exe = _compile(_translation_unit(kernel, spec), workdir)
    paths = []
    for i, arr in enumerate(spec.inputs):
        p = workdir / f"in{i}.bin"
        data = arr.view(mx.uint16) if arr.dtype in (mx.bfloat16, mx.float16) else arr
        np.asarray(mx.contiguous(data)).tofile(p)
        paths.append(str(p))
    outs = [str(workdir / f"out{j}.bin") for j in range(len(spec.output_shapes))]
    p = subprocess.run([str(exe), *paths, *outs], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise EmulationError(f"emulated kernel exited {p.returncode}: {p.stderr[:300]}")
    results = []
    for path, shape, dtype in zip(outs, spec.output_shapes, spec.output_dtypes):
        if dtype in (mx.bfloat16, mx.float16):
            raw = np.fromfile(path, dtype=np.uint16).reshape(shape)
            results.append(mx.array(raw).view(dtype))
        else:
            np_dtype = np.dtype(str(dtype).split(".")[-1].replace("bool_", "bool"))
            results.append(mx.array(np.fromfile(path, dtype=np_dtype).reshape(shape)))
    return results[0] if len(results) == 1 else tuple(results)
