"""zmlx.kernels.ptx_cache: MLX's kernel source, module name and cache entry, rebuilt outside MLX.

On the CPU: the hash against libstdc++'s own (g++), the source against MLX's build_kernel as
custom_kernel.cpp writes it, the recorder, and NVRTC entries (the developer machine's NVRTC).
On the GPU (`cuda`): MLX prints the same source for every kernel's example launch, and MLX
runs what an entry in its cache holds instead of compiling the kernel again.
"""

import importlib
import pkgutil
import random
import re
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest
from toolchain_marks import needs_nvrtc

import zmlx.kernels
from zmlx import config
from zmlx.kernels import core, metal_emu, ptx_cache
from zmlx.kernels.core import KernelDef, Launch, kernel_kwargs


def _probe(body: str, name: str = "ptx_probe") -> KernelDef:
    return KernelDef(
        name=name,
        reference=lambda x: x + 1,
        body=body,
        input_names=("x", "s"),
        output_names=("out", "aux"),
    )


def _spec(template: list, n: int = 8) -> Launch:
    return Launch(
        inputs=[mx.zeros((2, n // 2), mx.float32), mx.array(3, mx.int32)],
        template=template,
        grid=(n, 1, 1),
        threadgroup=(n, 1, 1),
        output_shapes=[(n,), (1,)],
        output_dtypes=[mx.float32, mx.bfloat16],
    )


ADD_ONE = "uint i = threadIdx.x; if (i < N) { out[i] = x[i] + 1.0f; } aux[0] = T(0);"


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_std_hash_is_libstdcxx_std_hash(tmp_path):
    cases = [b"", b"a", b"abcdefg", b"abcdefgh", b"abcdefghi", bytes(range(256)) * 3, random.randbytes(20011)]
    for i, data in enumerate(cases):
        (tmp_path / f"{i}.bin").write_bytes(data)
    (tmp_path / "h.cpp").write_text(
        "#include <fstream>\n#include <iostream>\n#include <sstream>\n#include <string>\n"
        "int main(int c, char** v) { for (int i = 1; i < c; i++) { std::ifstream f(v[i], std::ios::binary);"
        " std::stringstream s; s << f.rdbuf(); std::cout << std::hash<std::string>{}(s.str()) << '\\n'; } }\n"
    )
    subprocess.run(["g++", "-O1", "-o", str(tmp_path / "h"), str(tmp_path / "h.cpp")], check=True)
    out = subprocess.run(
        [str(tmp_path / "h"), *(str(tmp_path / f"{i}.bin") for i in range(len(cases)))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [int(v) for v in out] == [ptx_cache.std_hash(d) for d in cases]


def test_the_source_is_build_kernels_byte_for_byte():
    """custom_kernel.cpp's build_kernel: default header, header, namespace, the signature (an
    array's shape, strides and ndim where the source names them, none for a 0-d input), the
    template lines and a blank line, the source, the closing lines."""
    kernel = _probe("int a = x_shape[0] + x_strides[1] + x_ndim; int b = s_shape; " + ADD_ONE)
    src = ptx_cache.cuda_source(kernel, _spec([("T", mx.bfloat16), ("N", 8), ("B", True)]))
    header, body = kernel.source("cuda")
    want = (
        '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
        + header
        + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        + "__global__ void custom_kernel_zmlx_ptx_probe_bfloat16_t_8_t(\n"
        + "    const float* x,\n"
        + "    const __grid_constant__ Shape x_shape,\n"
        + "    const __grid_constant__ Strides x_strides,\n"
        + "    const __grid_constant__ int x_ndim,\n"
        + "    const int32_t* s,\n"
        + "    float* out,\n"
        + "    __nv_bfloat16* aux) {\n"
        + "  using T = __nv_bfloat16;\n  constexpr int N = 8;\n  constexpr bool B = true;\n\n"
        + body
        + "\n}\n\n} // namespace mlx::core::cu\n"
    )
    assert src == want
    bare = ptx_cache.cuda_source(_probe(ADD_ONE), _spec([]))
    assert "__global__ void custom_kernel_zmlx_ptx_probe(\n    const float* x,\n    const int32_t* s," in bare
    assert "__nv_bfloat16* aux) {\n" + _probe(ADD_ONE).source("cuda")[1] in bare  # no template, no blank line


def test_module_names_and_their_paths():
    src = ptx_cache.cuda_source(_probe(ADD_ONE), _spec([("N", 8), ("B", False)]))
    name = ptx_cache.module_name(src)
    assert name == f"custom_kernel_zmlx_ptx_probe_8_f_{ptx_cache.std_hash(src.encode()):x}"
    assert ptx_cache.module_name(src + " ") != name
    assert ptx_cache.entry_path(Path("/c"), name) == Path(f"/c/{name}.ptx")
    long = "m" * 600
    assert ptx_cache.entry_path(Path("/c"), long) == Path("/c", "m" * 245, "m" * 245, "m" * 110 + ".ptx")
    with pytest.raises(ValueError, match="not a custom kernel"):
        ptx_cache.module_name("int main() {}")


def test_the_recorder_writes_each_distinct_source_once(tmp_path):
    kernel = _probe(ADD_ONE)
    folder = tmp_path / "sources"
    with ptx_cache.recording(folder) as rec:
        assert core.RECORD is rec
        rec(kernel, _spec([("N", 8)]))
        rec(kernel, _spec([("N", 8)]))  # the same launch again
        rec(kernel, _spec([("N", 16)], n=16))
    assert core.RECORD is None
    files = sorted(folder.iterdir())
    assert len(files) == 2 and all(f.suffix == ".cu" for f in files)  # no temporary files left
    texts = {f.read_text() for f in files}
    want = [ptx_cache.cuda_source(kernel, _spec([("N", n)], n=n)) for n in (8, 16)]
    assert texts == set(want)
    with ptx_cache.recording(folder) as rec:  # QUIET repeats in a row: it stops by itself
        rec.QUIET = 3
        for _ in range(2):
            rec(kernel, _spec([("N", 8)]))
        assert core.RECORD is rec
        rec(kernel, _spec([("N", 32)], n=32))  # something new: the count starts again
        for _ in range(3):
            rec(kernel, _spec([("N", 8)]))
        assert core.RECORD is None
    assert len(list(folder.iterdir())) == 3
    ptx_cache.start_recording(folder)
    assert isinstance(core.RECORD, ptx_cache.Recorder)
    ptx_cache.stop_recording()
    assert core.RECORD is None
    ptx_cache.start_recording(None)
    assert core.RECORD is None


def test_a_run_kernel_call_on_cuda_is_recorded(tmp_path, monkeypatch):
    """core.run_kernel shows the recorder each CUDA launch (built, not run: no GPU here)."""
    from zmlx.kernels.residual_norm import residual_norm

    fake = lambda **kw: [mx.zeros(s) for s in kw["output_shapes"]]  # noqa: E731
    monkeypatch.setattr(core, "build", lambda kernel, backend: fake)
    args, kw = residual_norm.example()
    with ptx_cache.recording(tmp_path):
        residual_norm.run_kernel("cuda", *args, **kw)
        residual_norm.run_kernel("metal", *args, **kw)  # another backend: not recorded
    [one] = tmp_path.iterdir()
    assert one.read_text() == ptx_cache.cuda_source(residual_norm, residual_norm.launch("cuda", *args, **kw))


@needs_nvrtc
def test_an_entry_is_what_mlx_reads(tmp_path):
    kernel = _probe(ADD_ONE)
    src = ptx_cache.cuda_source(kernel, _spec([("T", mx.float32), ("N", 8)]))
    (tmp_path / "a.cu").write_text(src)
    (tmp_path / "bad.cu").write_text(src.replace("out[i] = x[i] + 1.0f;", "out[i] = undefined_name;"))
    cache = tmp_path / "cache"
    tool = ptx_cache.check_toolchain()
    got = ptx_cache.compile_into([tmp_path / "a.cu", tmp_path / "bad.cu"], cache, tool)
    module = ptx_cache.module_name(src)
    assert got[module] == "compiled"
    assert got["bad.cu"].startswith("failed") and "undefined_name" in got["bad.cu"]
    ptx = ptx_cache.entry_path(cache, module)
    cubin = ptx.read_bytes()
    assert cubin[:4] == b"\x7fELF" and int.from_bytes(cubin[18:20], "little") == 190  # EM_CUDA
    name, mangled = ptx.with_suffix(".txt").read_text().rstrip("\n").split("\t")
    assert name == "mlx::core::cu::custom_kernel_zmlx_ptx_probe_float_8"
    assert mangled.startswith("_ZN3mlx4core2cu")
    assert ptx.with_suffix(".cu").read_text() == src
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{module}{s}" for s in (".cu", ".ptx", ".txt"))
    assert ptx_cache.compile_into([tmp_path / "a.cu"], cache, tool) == {module: "there"}


def _all_kernels() -> list[KernelDef]:
    for info in pkgutil.iter_modules(zmlx.kernels.__path__):
        if not info.ispkg:
            importlib.import_module(f"zmlx.kernels.{info.name}")
    return sorted((k for k in core._DEFINED if k.body and k.example and k.launch), key=lambda k: k.name)


@pytest.mark.cuda
def test_on_the_gpu_mlx_builds_the_same_source(capfd):
    """For each kernel's example launch, the source MLX prints (verbose) is cuda_source's."""
    mx.set_default_device(mx.gpu)
    checked = 0
    for kernel in _all_kernels():
        args, kw = kernel.example()
        spec = kernel.launch("cuda", *args, **kw)
        if isinstance(spec, core.Skip):
            continue
        capfd.readouterr()
        # MLX prints the source when the call is built; not evaluated, nothing is compiled
        core.build(kernel, "cuda")(inputs=spec.inputs, **kernel_kwargs(spec), verbose=True)
        printed = capfd.readouterr().out
        found = re.search(r"Generated source code for `(\w+)`:\n```\n(.*)\n```\n", printed, re.S)
        assert found, (kernel.name, printed[:300])
        assert found.group(1) == ptx_cache.kernel_name(kernel, spec.template), kernel.name
        assert found.group(2) == ptx_cache.cuda_source(kernel, spec), kernel.name
        checked += 1
    assert checked >= 15


@pytest.mark.cuda
def test_on_the_gpu_mlx_runs_the_entry_it_finds():
    """An entry compiled from another body under the launch's module name: MLX runs it (42s),
    so it looked the module up by the name ptx_cache gives and did not compile the source."""
    mx.set_default_device(mx.gpu)
    n = random.randrange(1000, 1_000_000)  # a module (template N) no other process has built
    kernel = _probe(ADD_ONE, name="ptx_probe_read")
    spec = _spec([("T", mx.float32), ("N", n)])
    src = ptx_cache.cuda_source(kernel, spec)
    cache = config.mlx_ptx_cache_dir(mx.__version__)
    module = ptx_cache.module_name(src)
    poisoned = src.replace("out[i] = x[i] + 1.0f;", "out[i] = 42.0f;")
    tool = ptx_cache.mlx_toolchain()
    made = []
    try:
        ptx_cache.compile_one(poisoned, cache, tool)
        # compile_one named the entry after the poisoned source: move it to the real module's name
        for suffix in (".ptx", ".txt", ".cu"):
            got = ptx_cache.entry_path(cache, ptx_cache.module_name(poisoned)).with_suffix(suffix)
            made.append(got)
            made.append(got.rename(ptx_cache.entry_path(cache, module).with_suffix(suffix)))
        out = core.build(kernel, "cuda")(inputs=spec.inputs, **kernel_kwargs(spec))
        assert mx.all(out[0] == 42).item(), out[0]
    finally:
        for path in made:  # this test's own files
            path.unlink(missing_ok=True)


@needs_nvrtc
def test_same_as_mlx_compares_an_entry_s_cubin_with_its_source_compiled_again(tmp_path):
    """An entry MLX wrote for its own kernel (source, names, cubin): compiled again it gives the
    same bytes; a cubin not from that source is told apart."""
    tool = ptx_cache.check_toolchain()
    name = "mlx::core::cu::mlx_own_probe"
    source = "namespace mlx::core::cu {\n__global__ void mlx_own_probe(float* y) { y[0] = 1.0f; }\n}\n"
    cubin, mangled = ptx_cache.compile_source(source, "mlx_own_probe", [name], tool)
    (tmp_path / "mlx_own_probe.cu").write_text(source)
    (tmp_path / "mlx_own_probe.txt").write_text(f"{name}\t{mangled[name]}\n")
    (tmp_path / "mlx_own_probe.ptx").write_bytes(cubin)
    assert ptx_cache.same_as_mlx(tmp_path, tool) == {"mlx_own_probe": True}
    (tmp_path / "mlx_own_probe.ptx").write_bytes(cubin[:-1] + bytes([cubin[-1] ^ 1]))
    assert ptx_cache.same_as_mlx(tmp_path, tool) == {"mlx_own_probe": False}


@pytest.mark.cuda
def test_on_the_gpu_mlx_s_own_entries_compile_here_to_its_cubins():
    """A fused elementwise kernel MLX compiles and caches itself, compiled again through
    mlx_toolchain: byte for byte MLX's cubin, so entries made here are what MLX would make."""
    mx.set_default_device(mx.gpu)
    fused = mx.compile(lambda a, b: mx.exp(a) * b + 3.25)
    mx.eval(fused(mx.ones((1000,)), mx.ones((1000,))))
    cache = config.mlx_ptx_cache_dir(mx.__version__)
    same = ptx_cache.same_as_mlx(cache, ptx_cache.mlx_toolchain())
    assert same and all(same.values()), same


def test_a_folder_it_cannot_write_stops_recording_with_one_warning(tmp_path):
    """ZMLX_KERNEL_SOURCES naming a file (or an unwritable place): the kernel call goes on, one
    warning says why, and nothing more is recorded; the file is left as it was."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("mine")
    with ptx_cache.recording(blocker) as rec:
        with pytest.warns(UserWarning, match="cannot record into"):
            rec(_probe(ADD_ONE), _spec([("N", 8)]))
        assert core.RECORD is None
    assert blocker.read_text() == "mine"
