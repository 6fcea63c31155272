"""The ledger: one schema-versioned JSON line per (model, patterns, device) measurement.

Appends take an exclusive lock and write each line with one write call, so two runs
appending at once lose nothing and never interleave. Reading never crashes on a bad
line: it is reported with its line number and skipped.

The ledger is append-only. A measurement line is never changed; a line found to be wrong
(e.g. taken with a known-bad harness) is marked by appending a `supersede` line that names
it by its id (`line_id`: a hash of its content) and says why; `report` leaves such lines out.

Schema versions: 1 recorded an unknown git state as `dirty: false`; 2 records `null` when
unknown, and adds `command`, `env` (the ZMLX_* variables set) and `pattern_paths` (per
pattern: kernel or reference, and why); 3 adds the accuracy rule: `fidelity` may be
`ACCURATE` (tokens differ from stock's, the rule holds), and `fidelity_detail.accuracy`
holds the KL-divergence statistics against the float32 reference (zmlx.accuracy); 4 adds
the host time to issue one decode step, `issue_ms_per_step` and `stock_issue_ms_per_step`,
and the part of it that builds the step's graph, `build_ms_per_step` and
`stock_build_ms_per_step` (zmlx.bench.issue_time), and `compiled_decode` (its counters:
traces, compiled_steps, stock_steps by reason) on lines whose patterns applied it; since
2026-12-01 (same version) `issue_note` says why the issue time is null where its
measurement failed after the timed runs (as `kernels_note` does for the kernel count).
Older lines lack these fields: readers take a missing field as not measured.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

SCHEMA = "zmlx.matrix"
SCHEMA_VERSION = 4
SUPERSEDE = "supersede"  # the `kind` of a line that marks another one superseded

REQUIRED = ("schema", "schema_version", "timestamp", "model", "patterns", "device", "fidelity")
REQUIRED_SUPERSEDE = ("schema", "schema_version", "timestamp", "kind", "target", "reason")


class LedgerError(ValueError):
    """A ledger line zmlx will not write; the message says why."""


@dataclass
class Ledger:
    entries: list[dict[str, Any]] = field(default_factory=list)  # measurement lines, in order
    problems: list[str] = field(default_factory=list)  # "line N: why", for bad lines skipped
    superseded: dict[str, dict[str, Any]] = field(default_factory=dict)  # line id -> its supersede line

    def current(self) -> list[dict[str, Any]]:
        """The measurement lines no supersede line names."""
        return [e for e in self.entries if line_id(e) not in self.superseded]


def line_id(entry: dict[str, Any]) -> str:
    """A short, stable id of a line: the hash of its content (keys sorted)."""
    text = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


class LedgerPathError(ValueError):
    """A ledger path zmlx cannot append to; the message says why."""


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse, before any measurement, a ledger path that cannot take an append."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise LedgerPathError(f"--ledger {path} is a directory: give a file, e.g. {path / 'matrix.jsonl'}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise LedgerPathError(f"--ledger {path} is not writable")
        return path
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LedgerPathError(f"--ledger {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LedgerPathError(f"--ledger {path}: cannot create files in {parent}")
    return path


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
    kind = entry.get("kind")
    if kind not in (None, SUPERSEDE):
        return f"unknown kind {kind!r}"
    missing = [k for k in (REQUIRED_SUPERSEDE if kind else REQUIRED) if k not in entry]
    if missing:
        return f"missing {', '.join(missing)}"
    return None


def append(entry: dict[str, Any], path: str | os.PathLike) -> Path:
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


def read(path: str | os.PathLike) -> Ledger:
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
            if entry.get("kind") == SUPERSEDE:
                ledger.superseded.setdefault(entry["target"], entry)
            else:
                ledger.entries.append(entry)
    return ledger


def merge(source: str | os.PathLike, path: str | os.PathLike, commit_exists=None) -> tuple[int, list[str]]:
    """Append the good lines of another ledger (e.g. one brought back from the GPU
    machine), skipping lines already present. `commit_exists(sha) -> bool | None` checks a
    line's stated commit where the repository is at hand: a line whose commit is not in it
    is refused (a problem), since nothing could reproduce it. Returns (appended, problems)."""
    incoming = read(source)
    here = read(path)
    present = {line_id(e) for e in here.entries} | {("mark", t) for t in here.superseded}
    problems = list(incoming.problems)
    n = 0
    lines = [*incoming.entries, *incoming.superseded.values()]
    for entry in lines:
        key = ("mark", entry["target"]) if entry.get("kind") == SUPERSEDE else line_id(entry)
        if key in present:
            continue
        commit = (entry.get("git") or {}).get("commit")
        if commit and commit_exists is not None and commit_exists(commit) is False:
            problems.append(f"line {line_id(entry)}: commit {commit} is not in this repository (refused)")
            continue
        append(entry, path)
        present.add(key)
        n += 1
    return n, problems


def supersede(path: str | os.PathLike, ids: Iterable[str], reason: str, timestamp: str) -> list[str]:
    """Mark lines superseded by appending one supersede line each; returns the full ids.
    `ids` may be unique prefixes. Raises LedgerError for an unknown, ambiguous or already
    superseded id, or an empty reason, before anything is written."""
    if not reason.strip():
        raise LedgerError("a reason is required (say what was wrong with the line)")
    data = read(path)
    known = [line_id(e) for e in data.entries]
    targets = []
    for prefix in ids:
        hits = [k for k in known if k.startswith(prefix)]
        if len(hits) != 1:
            why = "no line" if not hits else f"{len(hits)} lines"
            raise LedgerError(f"id {prefix!r} matches {why} in {path}")
        if hits[0] in data.superseded:
            raise LedgerError(f"line {hits[0]} is already superseded: {data.superseded[hits[0]]['reason']}")
        targets.append(hits[0])
    for target in targets:
        append(
            {
                "schema": SCHEMA,
                "schema_version": SCHEMA_VERSION,
                "timestamp": timestamp,
                "kind": SUPERSEDE,
                "target": target,
                "reason": reason.strip(),
            },
            path,
        )
    return targets


def select(entries: Iterable[dict[str, Any]], model_substring: str | None) -> list[dict[str, Any]]:
    if not model_substring:
        return list(entries)
    s = model_substring.lower()
    return [e for e in entries if s in str(e.get("model", "")).lower()]
