"""Repro capsules: one versioned JSON record per experiment, written atomically."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from zmlx.bench import stamp
from zmlx.config import env_overrides

SCHEMA = "zmlx.capsule"
SCHEMA_VERSION = 1


class CapsuleError(ValueError):
    """A file that is not a capsule this zmlx can read; the message says why."""


def build(
    *,
    name: str,
    model: dict[str, Any],
    params: dict[str, Any],
    variants: Sequence[dict[str, Any]],
    command: Sequence[str] | None = None,
    git: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`git`: the measured code's stamp.git(), taken before measuring (so that a bad stated
    commit stops the run before it spends time); taken here when not given."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(command if command is not None else [sys.executable, *sys.argv]),
        "env_overrides": env_overrides(),
        "model": model,
        "device": stamp.device(),
        "versions": stamp.versions(),
        "git": git if git is not None else stamp.git(),
        "params": params,
        "baseline": variants[0]["name"] if variants else None,
        "variants": list(variants),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60]


def write(capsule: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename) under a name that says what and where."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp_ = capsule["created"].replace(":", "").replace("-", "")[:15]
    device = capsule["device"]["backend"]
    path = directory / f"{stamp_}_{_slug(capsule['model']['name'])}_{device}_{_slug(capsule['name'])}.json"
    n = 1
    while path.exists():
        n += 1
        path = path.with_name(f"{path.stem.rsplit('~', 1)[0]}~{n}.json")
    fd, tmp = tempfile.mkstemp(prefix=".capsule-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(capsule, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def dir_problem(directory: str | os.PathLike | None, option: str = "--capsule-dir") -> str | None:
    """Why `directory` cannot take capsules (it exists and is not a folder), for a one-line
    error before a script measures anything; None when it can (or none was given)."""
    if directory and os.path.exists(directory) and not os.path.isdir(directory):
        return f"{option} {directory} is not a directory"
    return None


def write_or_say(capsule: dict[str, Any], directory: str | os.PathLike, option: str = "--capsule-dir") -> str:
    """`write`, as a script reports it: "capsule: PATH", or ValueError with the one-line
    reason the folder refused it (the measurement itself is printed before)."""
    try:
        return f"capsule: {write(capsule, directory)}"
    except OSError as e:
        raise ValueError(f"{option} {directory}: {e.strerror or e}") from None


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CapsuleError(f"no such capsule: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CapsuleError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise CapsuleError(f"{path} is not a zmlx capsule (no schema {SCHEMA!r})")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CapsuleError(
            f"{path} has schema_version {version!r}; this zmlx reads up to {SCHEMA_VERSION}: upgrade zmlx"
        )
    return data
