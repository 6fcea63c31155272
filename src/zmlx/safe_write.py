"""Replace a directory zmlx owns, atomically; never touch one it does not.

A directory is zmlx's when it holds a manifest that zmlx wrote last, and nothing but the
files that manifest lists. Writing one goes to a temporary sibling first; the manifest is
written once every other file is complete, and only then is the sibling renamed into place
(the old directory is moved aside, the new one renamed in, the old one removed; on failure
the old one is put back). A crash, an exception or SIGTERM leaves the old directory as it
was and no temporary folder behind.

    with safe_write.replacing(out, manifest="zmlx-synth.json", overwrite=True) as tmp:
        ...  # write every file into tmp
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Iterator


class OutputError(ValueError):
    """An output directory that may not be written; the message says why and what to do."""


def check_target(out: str | os.PathLike, *, manifest: str, overwrite: bool) -> Path:
    """The resolved directory to write, or OutputError if writing it could lose anything.

    Allowed: a path that does not exist, an empty directory, and (with `overwrite`) a
    directory zmlx wrote. Refused: a file, a symbolic link, the current directory or one
    of its parents, and any other directory. Reads only; never writes.
    """
    try:
        return _check(Path(out), manifest, overwrite)
    except OSError as e:  # an unreadable parent, a deleted working directory
        raise OutputError(f"cannot check {out}: {e.strerror or e}") from None


def _check(out: Path, manifest: str, overwrite: bool) -> Path:
    if out.is_symlink():
        raise OutputError(f"{out} is a symbolic link; give the real directory (or a new name)")
    real = out.resolve()
    cwd = Path.cwd().resolve()
    # Also covers "/": renaming a directory the process or the shell stands in is never wanted.
    if real == cwd or real in cwd.parents:
        raise OutputError(f"{out} is the current directory or one of its parents; give a new directory")
    if not real.exists():
        return real
    if not real.is_dir():
        raise OutputError(f"{out} exists and is not a directory; give a new directory")
    reason = _not_owned(real, manifest)
    if reason == "":
        if not overwrite:
            raise OutputError(
                f"{out} exists (zmlx wrote it); pass overwrite=True (--overwrite) to replace it"
            )
        return real
    if reason is None:  # empty
        return real
    raise OutputError(
        f"{out} is not a directory zmlx wrote ({reason}); nothing was changed: "
        f"choose another output directory or remove it yourself"
    )


def _not_owned(path: Path, manifest: str) -> str | None:
    """'' if zmlx wrote `path`, None if it is empty, else why it is not zmlx's."""
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        return f"cannot list it: {e.strerror}"
    if not entries:
        return None
    mpath = path / manifest
    if manifest not in entries or mpath.is_symlink() or not mpath.is_file():
        return f"it holds files and no {manifest}"
    try:
        files = json.loads(mpath.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {manifest} is unreadable"
    if not isinstance(files, list):
        return f"its {manifest} is unreadable"
    for name in entries:
        if name != manifest and name not in files:
            return f"{name!r} is not one of the files zmlx wrote there"
        entry = path / name
        if entry.is_symlink() or not entry.is_file():
            return f"{name!r} is not a plain file"
    return ""


@contextlib.contextmanager
def replacing(
    out: str | os.PathLike, *, manifest: str, overwrite: bool = False, stamp: dict[str, Any] | None = None
) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out`; on a clean exit, make it `out`.

    `out` is checked first (`check_target`) and again just before the swap, so a
    directory that changed hands meanwhile is not replaced. `stamp` goes into the manifest.
    """
    real = check_target(out, manifest=manifest, overwrite=overwrite)
    tmp = real.parent / f".{real.name}.zmlx-tmp-{secrets.token_hex(4)}"
    guard = _TermGuard()
    with guard:
        try:
            try:
                real.parent.mkdir(parents=True, exist_ok=True)
                tmp.mkdir()
            except OSError as e:
                raise OutputError(f"cannot write next to {out}: {e.strerror or e}") from None
            yield tmp
            files = sorted(os.listdir(tmp))
            # Written last: a directory without it is never taken for a complete one of ours.
            (tmp / manifest).write_text(json.dumps({**(stamp or {}), "files": files}, indent=2) + "\n")
            with guard.deferred():
                check_target(out, manifest=manifest, overwrite=overwrite)
                _swap(tmp, real)
        except BaseException:
            with guard.deferred():
                shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and restored on failure."""
    if not out.exists():
        new.rename(out)
        return
    trash = out.parent / f".{out.name}.zmlx-old-{secrets.token_hex(4)}"
    out.rename(trash)
    try:
        new.rename(out)
    except BaseException:
        trash.rename(out)
        raise
    shutil.rmtree(trash, ignore_errors=True)


class _TermGuard:
    """Turn SIGTERM into SystemExit(143) while a write runs, so its cleanup runs too.

    Only in the main thread and only where SIGTERM has its default action: a program
    with its own handler keeps it. Inside `deferred()` (the swap) the exit waits until
    the swap is done, so the directory is never left half-replaced.
    """

    def __init__(self):
        self.installed = False
        self.previous = None
        self.defer = False
        self.pending = False

    def _handle(self, signum, frame):
        if self.defer:
            self.pending = True
            return
        raise SystemExit(128 + signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                self.previous = signal.signal(signal.SIGTERM, self._handle)
                self.installed = True
        return self

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous)
            self.installed = False

    @contextlib.contextmanager
    def deferred(self):
        self.defer = True
        try:
            yield
        finally:
            self.defer = False
        if self.pending:
            raise SystemExit(128 + signal.SIGTERM)
