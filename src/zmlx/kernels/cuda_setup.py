"""Fetch what `cuda_check` needs from PyPI, for the installed MLX version, into its cache.

    python -m zmlx.kernels.cuda_setup      (.ci/run runs it; does nothing when already done)

No GPU is needed. pip downloads, pinned:
- `mlx-cuda-13==<installed mlx>`: MLX's bundled headers (`mlx/include`: cccl, cute,
  cutlass, mlx) and, embedded in its libmlx.so, the device headers its JIT hands to NVRTC
  in memory (`mlx/backend/cuda/device/*`: no MLX wheel or sdist on PyPI has them as files);
- `nvidia-cuda-nvrtc` and `nvidia-cuda-runtime` 13.0 (the GPU machine's CUDA): NVRTC and
  the CUDA runtime headers.
Only the files the check reads are kept, in `cuda_check.cache_dir()`; the wheels are not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

from zmlx.kernels import cuda_check

CUDA = "13.0.*"  # the CUDA release MLX's CUDA wheel runs with on the GPU machine
DEVICE_PREFIX = b"mlx/backend/cuda/device/"
_RELATIVE = {8, 1027}  # R_X86_64_RELATIVE, R_AARCH64_RELATIVE


class SetupError(RuntimeError):
    """The download failed or a wheel does not hold what the check needs."""


def wheels(mlx_version: str) -> list[str]:
    """The pinned requirements, for this MLX version."""
    return [f"mlx-cuda-13=={mlx_version}", f"nvidia-cuda-nvrtc=={CUDA}", f"nvidia-cuda-runtime=={CUDA}"]


def embedded_headers(lib: bytes) -> dict[str, bytes]:
    """MLX's JIT device headers, by include name, from a libmlx.so (ELF64, little-endian).

    jit_module.cpp keeps two arrays of `const char*` side by side, the include names
    (`g_include_names`) and the NUL-terminated sources (`g_headers`), in the same order; in
    the shared library each pointer is a RELATIVE relocation whose addend is the string's
    address. The names array is the run of pointers to "mlx/backend/cuda/device/..."; the
    sources array is the one run at a fixed distance whose every string opens with MLX's
    copyright line."""
    if lib[:6] != b"\x7fELF\x02\x01":
        raise SetupError("libmlx.so is not a 64-bit little-endian ELF file")
    phoff, shoff = struct.unpack_from("<QQ", lib, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", lib, 0x36)
    loads = []
    for i in range(phnum):
        p_type, _, p_off, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", lib, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_off, p_filesz))
    pointers = {}  # slot address -> address it points to
    for i in range(shnum):
        (sh_type,) = struct.unpack_from("<I", lib, shoff + i * shentsize + 4)
        sh_off, sh_size = struct.unpack_from("<QQ", lib, shoff + i * shentsize + 0x18)
        if sh_type == 4:  # SHT_RELA
            for r in range(sh_off, sh_off + sh_size, 24):
                slot, info, addend = struct.unpack_from("<QQq", lib, r)
                if info & 0xFFFFFFFF in _RELATIVE:
                    pointers[slot] = addend

    def string(addr: int) -> bytes | None:
        for vaddr, off, size in loads:
            if vaddr <= addr < vaddr + size:
                start = addr - vaddr + off
                return lib[start : lib.index(b"\0", start)]
        return None

    names = {}
    for slot, addr in pointers.items():
        s = string(addr)
        if (
            s
            and s.startswith(DEVICE_PREFIX)
            and s.replace(b"_", b"").replace(b".", b"").replace(b"/", b"").isalnum()
        ):
            names[slot] = s.decode()
    slots = sorted(names)
    if not slots or slots[-1] - slots[0] != 8 * (len(slots) - 1):
        raise SetupError("libmlx.so has no array of MLX's device header names (has jit_module.cpp changed?)")
    found: list[list[bytes]] = []
    for delta in range(-4096, 4097, 8):
        if abs(delta) < 8 * len(slots):
            continue
        texts = [string(pointers[s + delta]) if s + delta in pointers else None for s in slots]
        headers = [t for t in texts if t is not None and t.startswith(b"// Copyright")]
        if len(headers) == len(slots):
            found.append(headers)
    if len(found) != 1:
        raise SetupError(f"libmlx.so: {len(found)} candidate arrays of MLX's device headers, expected 1")
    return {names[s]: t for s, t in zip(slots, found[0])}


def _extract(wheel: Path, prefix: str, dest: Path, only: tuple[str, ...] = ()) -> int:
    """Copy the wheel's files under `prefix` (or just the named ones) into dest; their count."""
    n = 0
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            rel = name[len(prefix) :]
            if not name.startswith(prefix) or name.endswith("/") or (only and rel not in only):
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(out, "wb") as f:
                shutil.copyfileobj(src, f)
            n += 1
    return n


def _one(folder: Path, stem: str) -> Path:
    found = sorted(folder.glob(f"{stem}-*.whl"))
    if len(found) != 1:
        raise SetupError(f"expected one {stem} wheel in the download, found {len(found)}")
    return found[0]


def setup(dest: Path | None = None, *, force: bool = False) -> Path:
    """Fill dest (default: cuda_check.cache_dir()) unless it is already complete; dest."""
    dest = dest or cuda_check.cache_dir()
    mlx_version = version("mlx")
    pins, done = wheels(mlx_version), dest / cuda_check.STAMP
    if not force and done.exists() and json.loads(done.read_text()).get("requirements") == pins:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        dl, new = Path(tmp) / "wheels", Path(tmp) / "new"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(dl),
            *pins,
        ]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            lines = p.stderr.splitlines()
            why = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:]
            raise SetupError(f"pip download {' '.join(pins)} failed: {' '.join(why)}")
        mlx = _one(dl, "mlx_cuda_13")
        _extract(mlx, "mlx/include/", new / "include")
        with zipfile.ZipFile(mlx) as z:
            headers = embedded_headers(z.read("mlx/lib/libmlx.so"))
        for name, text in headers.items():
            (new / "include" / name).parent.mkdir(parents=True, exist_ok=True)
            (new / "include" / name).write_bytes(text)
        lib = "nvidia/cu13/lib/"
        nvrtc = _one(dl, "nvidia_cuda_nvrtc")
        with zipfile.ZipFile(nvrtc) as z:  # the plain libraries, not the .alt ones
            keep = tuple(
                n[len(lib) :] for n in z.namelist() if n.startswith(lib + "libnvrtc") and ".alt." not in n
            )
        if _extract(nvrtc, lib, new / lib, keep) < 2:
            raise SetupError(f"{nvrtc.name} has no libnvrtc and libnvrtc-builtins")
        _extract(_one(dl, "nvidia_cuda_runtime"), "nvidia/cu13/include/", new / "nvidia/cu13/include")
        stamp = {
            "mlx": mlx_version,
            "requirements": pins,
            "wheels": sorted(w.name for w in dl.glob("*.whl")),
            "device_headers": sorted(headers),
        }
        (new / cuda_check.STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        new.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=cuda_check.SETUP, description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="download again even when the cache is complete")
    args = ap.parse_args(argv)
    if not cuda_check.supported():
        print(f"cuda_setup: nothing to do: {cuda_check.UNSUPPORTED}")
        return 0
    try:
        dest = setup(force=args.force)
    except (SetupError, OSError) as e:
        print(f"cuda_setup: {e}", file=sys.stderr)
        return 1
    stamp = json.loads((dest / cuda_check.STAMP).read_text())
    print(
        f"cuda_setup: NVRTC and MLX {stamp['mlx']}'s CUDA headers ({len(stamp['device_headers'])} "
        f"device headers) in {dest}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
