"""What every record says about where it was measured: versions, device, commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import mlx.core as mx

from zmlx import __version__, backend
from zmlx.config import git_override


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "mlx": mx.__version__, "zmlx": __version__}
    try:
        out["mlx_lm"] = version("mlx-lm")
    except PackageNotFoundError:
        out["mlx_lm"] = "unknown"
    return out


def device() -> dict[str, Any]:
    info = {}
    try:
        info = dict(mx.device_info())
    except Exception:  # optional across MLX versions and backends
        pass
    memory = info.get("memory_size") or info.get("total_memory")
    return {
        "name": backend.device_name(),
        "backend": backend.current(),
        "memory_bytes": int(memory) if memory else None,
        "host_memory_bytes": host_memory(),
        "host": platform.machine(),
    }


def host_memory(available: bool = False) -> int | None:
    """Total (or available) host RAM in bytes, where the OS says."""
    try:
        if available and Path("/proc/meminfo").exists():
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def git(root: Path | None = None) -> dict[str, Any]:
    """{'commit', 'dirty'} of the project checkout; the ZMLX_GIT_* overrides where
    the tree has no .git (the GPU machine gets a copy of the working tree only)."""
    commit, dirty = git_override()
    if commit:
        return {"commit": commit, "dirty": bool(dirty)}
    root = root or Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
            capture_output=True, text=True, check=True,
        ).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
