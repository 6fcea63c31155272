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

    out = {
        "python": platform.python_version(),
        "mlx": getattr(mx, "__version__", "unknown"),
        "zmlx": __version__,
    }
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
        "backend": backend.recorded(),  # "metal-emulated" under the emulation, never "metal"
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


class GitStateError(ValueError):
    """A stated commit that the repository at hand does not hold."""


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def checkout(root: Path | None = None) -> Path | None:
    """The project's git checkout (the tree this zmlx is imported from), or None: an
    installed zmlx, or a copy of the tree without .git (the GPU machine's)."""
    root = (root or Path(__file__).resolve().parents[3]).resolve()
    top = _git(root, "rev-parse", "--show-toplevel")
    return root if top and Path(top).resolve() == root else None


def commit_exists(sha: str, root: Path | None = None) -> bool | None:
    """Whether the checkout holds commit `sha`; None when there is no checkout to ask."""
    repo = checkout(root)
    if repo is None:
        return None
    return _git(repo, "rev-parse", "--verify", "--quiet", f"{sha}^{{commit}}") is not None


def git(root: Path | None = None) -> dict[str, Any]:
    """{'commit', 'dirty'} of the measured code. Where the checkout is at hand, both come
    from it, and a commit stated by ZMLX_GIT_COMMIT must exist in it (GitStateError
    otherwise). Without a checkout (the GPU machine gets a copy of the tree), the stated
    commit is recorded as given and `dirty` is ZMLX_GIT_DIRTY's value, or None: unknown
    is recorded as unknown, never as clean."""
    stated, stated_dirty = git_override()
    repo = checkout(root)
    if repo is None:
        return {"commit": stated, "dirty": stated_dirty if stated else None}
    head = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None else bool(status)
    if not stated:
        return {"commit": head, "dirty": dirty}
    full = _git(repo, "rev-parse", "--verify", "--quiet", f"{stated}^{{commit}}")
    if full is None:
        raise GitStateError(f"ZMLX_GIT_COMMIT={stated} is not a commit in {repo}")
    return {"commit": full, "dirty": dirty if full == head else stated_dirty}
