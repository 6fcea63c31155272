"""The ledger: one schema-versioned JSON line per (model, patterns, device) measurement.

Appends take an exclusive lock and write each line with one write call, so two runs
appending at once lose nothing and never interleave. Reading never crashes on a bad
line: it is reported with its line number and skipped.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

SCHEMA = "zmlx.matrix"
SCHEMA_VERSION = 1
DEFAULT_PATH = Path("matrix.jsonl")

REQUIRED = ("schema", "schema_version", "timestamp", "model", "patterns", "device", "fidelity")


class LedgerError(ValueError):
    """A ledger line zmlx will not write; the message says why."""


@dataclass
class Ledger:
    entries: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "line N: why", for bad lines skipped


def validate_entry(entry: dict[str, Any]) -> str | None:
    """None when the entry is a line this zmlx understands, else why not."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if entry.get("schema") != SCHEMA:
        return f"schema is {entry.get('schema')!r}, not {SCHEMA!r}"
    version = entry.get("schema_version")
    if not isinstance(version, int) or version < 1:
        return f"bad schema_version {version!r}"
    if version > SCHEMA_VERSION:
        return f"schema_version {version} is newer than this zmlx reads ({SCHEMA_VERSION}): upgrade zmlx"
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        return f"missing {', '.join(missing)}"
    return None


def append(entry: dict[str, Any], path: str | os.PathLike = DEFAULT_PATH) -> Path:
    """Append one line, locked; refuses an entry that would not read back."""
    why = validate_entry(entry)
    if why:
        raise LedgerError(f"not a ledger entry: {why}")
    line = json.dumps(entry, separators=(",", ":"), sort_keys=False)
    if "\n" in line:
        raise LedgerError("a ledger entry must serialize to one line")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = (line + "\n").encode()
        # A line torn by a crash must not swallow the next one.
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return path


def read(path: str | os.PathLike = DEFAULT_PATH) -> Ledger:
    """Every good line; every bad one as a problem with its line number."""
    path = Path(path)
    ledger = Ledger()
    if not path.exists():
        return ledger
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                entry = json.loads(text)
            except json.JSONDecodeError as e:
                ledger.problems.append(f"line {number}: not JSON ({e.msg})")
                continue
            why = validate_entry(entry)
            if why:
                ledger.problems.append(f"line {number}: {why}")
                continue
            ledger.entries.append(entry)
    return ledger


def merge(source: str | os.PathLike, path: str | os.PathLike = DEFAULT_PATH) -> tuple[int, list[str]]:
    """Append the good lines of another ledger (e.g. one brought back from the GPU
    machine), skipping lines already present. Returns (appended, problems)."""
    incoming = read(source)
    present = {json.dumps(e, sort_keys=True) for e in read(path).entries}
    n = 0
    for entry in incoming.entries:
        if json.dumps(entry, sort_keys=True) in present:
            continue
        append(entry, path)
        n += 1
    return n, incoming.problems


def select(entries: Iterable[dict[str, Any]], model_substring: str | None) -> list[dict[str, Any]]:
    if not model_substring:
        return list(entries)
    s = model_substring.lower()
    return [e for e in entries if s in str(e.get("model", "")).lower()]
