#!/usr/bin/env python3
"""zmlx's recorded CUDA kernels, compiled into MLX's PTX cache on the GPU machine.

    python3 benchmarks/gpu/ptx_cache.py compile SOURCES CACHE [--jobs N]
    python3 benchmarks/gpu/ptx_cache.py manifest
    python3 benchmarks/gpu/ptx_cache.py verify CACHE

`compile`: every `*.cu` in SOURCES (the sources a patched process recorded: ZMLX_KERNEL_SOURCES,
zmlx.kernels.ptx_cache) compiled with the NVRTC this machine's MLX loads, its device headers
and its options, N at once, into CACHE (MLX_PTX_CACHE_DIR), where any later process's MLX
finds them instead of compiling them again. An entry already there is kept; a source that
fails is reported and left to MLX's own JIT. Prints one summary line.
`manifest`: one line naming what a cache is valid for (MLX's version, the NVRTC library and a
hash of its bytes, the GPU's compute capability): env.sh restores a carried cache only on a
machine with the same.
`verify`: MLX's own entries in CACHE (it writes their source beside them) compiled here again:
exit 0 when each gives MLX's cubin byte for byte (the toolchain and options are its JIT's).
benchmarks/gpu/env.sh sets both variables; benchmarks/gpu/ptx_bank.sh runs `compile` and packs
the cache into $OUT for the next machine.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from zmlx.kernels import ptx_cache


def toolchain() -> ptx_cache.Toolchain:
    """MLX's toolchain, after one custom kernel has run: MLX has then loaded its NVRTC, so the
    library found is the one MLX itself compiles with, not a guess from the wheel's layout."""
    probe = mx.fast.cuda_kernel(
        name="zmlx_nvrtc_probe", input_names=["x"], output_names=["y"], source="y[0] = x[0];"
    )
    mx.eval(
        probe(
            inputs=[mx.zeros((1,))],
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
        )[0]
    )
    return ptx_cache.mlx_toolchain()


def manifest() -> str:
    """MLX's version, the NVRTC library's file and version, and the GPU's compute capability."""
    tool = toolchain()
    nvrtc = tool.load()
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    cc = subprocess.run(
        ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.split()
    library = tool.nvrtc.resolve()
    digest = hashlib.sha1(library.read_bytes()).hexdigest()[:12]  # the exact build, not just 13.0
    nvrtc_file = f"{library.name}/{major.value}.{minor.value}/{digest}"
    return f"mlx={mx.__version__} nvrtc={nvrtc_file} cc={cc[0] if cc else '?'}"


def main(argv: list[str]) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile")
    comp.add_argument("sources", type=Path)
    comp.add_argument("cache", type=Path)
    comp.add_argument("--jobs", type=int, default=8)
    sub.add_parser("manifest")
    ver = sub.add_parser("verify")
    ver.add_argument("cache", type=Path)
    args = parser.parse_args(argv)
    if args.command == "manifest":
        print(manifest())
        return 0
    if args.command == "verify":
        same = ptx_cache.same_as_mlx(args.cache, toolchain())
        print(
            f"ptx_cache verify: {sum(same.values())} of {len(same)} of MLX's own entries"
            " compile here to MLX's cubin"
        )
        for module, ok in same.items():
            print(f"  {'same' if ok else 'DIFFERENT'}: {module}")
        return 0 if same and all(same.values()) else 1
    files = sorted(args.sources.glob("*.cu")) if args.sources.is_dir() else []
    if not files:
        print(f"ptx_cache: no recorded sources in {args.sources}")
        return 0
    try:
        args.cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot make the cache folder {args.cache} ({e})", file=sys.stderr)
        return 2
    start = time.perf_counter()
    tool = toolchain()
    print(f"ptx_cache: NVRTC {tool.nvrtc}")
    results = ptx_cache.compile_into(files, args.cache, tool, jobs=args.jobs)
    failed = {k: v for k, v in results.items() if v.startswith("failed")}
    counts = {s: sum(v == s for v in results.values()) for s in ("compiled", "there")}
    print(
        f"ptx_cache: {counts['compiled']} compiled, {counts['there']} already there, {len(failed)} failed "
        f"({len(files)} sources, {time.perf_counter() - start:.1f} s, {args.jobs} jobs) into {args.cache}"
    )
    for name, why in list(failed.items())[:5]:
        print(f"  {name}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
