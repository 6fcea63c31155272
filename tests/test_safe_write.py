"""safe_write: only a directory zmlx wrote (or an empty one) is replaced, atomically; nothing else is lost."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from zmlx import safe_write

M = "zmlx-test.json"


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _write(out, files, overwrite=False):
    with safe_write.replacing(out, manifest=M, overwrite=overwrite) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def _user_folder(tmp_path: Path) -> Path:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "config.json").write_text("{}")  # looks like a checkpoint file, still the user's
    return d


def test_new_directory_gets_the_files_and_a_manifest_listing_them(tmp_path):
    _write(tmp_path / "ck", {"a.txt": "1", "b.txt": "2"})
    assert json.loads((tmp_path / "ck" / M).read_text())["files"] == ["a.txt", "b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary sibling left


def test_empty_directory_is_accepted_without_overwrite(tmp_path):
    (tmp_path / "ck").mkdir()
    _write(tmp_path / "ck", {"a.txt": "1"})
    assert (tmp_path / "ck" / "a.txt").read_text() == "1"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_users_folder_is_refused_and_untouched(tmp_path, overwrite):
    d = _user_folder(tmp_path)
    before = _tree(d)
    with pytest.raises(safe_write.OutputError, match="not a directory zmlx wrote"):
        _write(d, {"a.txt": "1"}, overwrite=overwrite)
    assert _tree(d) == before
    assert sorted(os.listdir(tmp_path)) == ["mine"]


def test_a_directory_zmlx_wrote_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "ck"
    _write(out, {"old.txt": "old"})
    with pytest.raises(safe_write.OutputError, match="exists .*overwrite"):
        _write(out, {"new.txt": "new"})
    _write(out, {"new.txt": "new"}, overwrite=True)
    assert sorted(os.listdir(out)) == ["new.txt", M]
    assert sorted(os.listdir(tmp_path)) == ["ck"]


@pytest.mark.parametrize(
    "spoil,reason",
    [
        (lambda d: (d / "notes.txt").write_text("mine"), "'notes.txt' is not one of the files"),
        (lambda d: (d / "sub").mkdir(), "'sub' is not one of the files"),
        (lambda d: (d / M).write_text("not json"), "unreadable"),
        (lambda d: (d / M).unlink(), "no zmlx-test.json"),
    ],
)
def test_a_directory_zmlx_wrote_and_the_user_changed_is_refused(tmp_path, spoil, reason):
    out = tmp_path / "ck"
    _write(out, {"old.txt": "old"})
    spoil(out)
    before = _tree(out)
    with pytest.raises(safe_write.OutputError, match=reason):
        _write(out, {"new.txt": "new"}, overwrite=True)
    assert _tree(out) == before


def test_files_symlinks_cwd_its_parents_and_root_are_refused(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("data")
    link = tmp_path / "link"
    link.symlink_to(_user_folder(tmp_path))
    work = tmp_path / "work"
    work.mkdir()  # empty: even an empty working directory is never replaced
    monkeypatch.chdir(work)
    for out, msg in [
        (f, "not a directory"),
        (link, "symbolic link"),
        (".", "current directory"),
        ("..", "current directory or one of its parents"),
        (tmp_path, "current directory or one of its parents"),
        ("/", "current directory or one of its parents"),
    ]:
        with pytest.raises(safe_write.OutputError, match=msg):
            safe_write.check_target(out, manifest=M, overwrite=True)
    with pytest.raises(safe_write.OutputError, match="current directory"):
        _write(".", {"a.txt": "1"}, overwrite=True)
    assert f.read_text() == "data" and link.is_symlink() and os.listdir(work) == []


def test_a_write_that_fails_midway_leaves_the_old_directory_and_no_temporary(tmp_path):
    out = tmp_path / "ck"
    _write(out, {"old.txt": "old"})
    before = _tree(out)
    with pytest.raises(RuntimeError):
        with safe_write.replacing(out, manifest=M, overwrite=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert _tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    out = tmp_path / "ck"
    _write(out, {"old.txt": "old"})
    before = _tree(out)
    rename = Path.rename

    def failing(self, target):
        if ".zmlx-tmp-" in self.name:
            raise OSError("rename failed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="rename failed"):
        _write(out, {"new.txt": "new"}, overwrite=True)
    assert _tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_directory_the_user_filled_during_the_write_is_not_replaced(tmp_path):
    out = tmp_path / "ck"
    with pytest.raises(safe_write.OutputError, match="not a directory zmlx wrote"):
        with safe_write.replacing(out, manifest=M) as tmp:
            (tmp / "a.txt").write_text("1")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert _tree(out) == {"theirs.txt": b"theirs"}
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_sigterm_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    _write(tmp_path / "ck", {"a.txt": "1"})
    assert signal.getsignal(signal.SIGTERM) == before


# A SIGTERM that arrives during the swap waits until the new directory is in place.
SIGTERM_IN_SWAP = """
import os, signal, sys
from zmlx import safe_write
swap = safe_write._swap
def swap_under_sigterm(new, out):
    os.kill(os.getpid(), signal.SIGTERM)
    swap(new, out)
safe_write._swap = swap_under_sigterm
with safe_write.replacing(sys.argv[1], manifest=sys.argv[2], overwrite=True) as tmp:
    (tmp / "new.txt").write_text("new")
"""


@pytest.mark.slow
def test_sigterm_during_the_swap_finishes_the_swap_then_exits(tmp_path):
    out = tmp_path / "ck"
    _write(out, {"old.txt": "old"})
    p = subprocess.run([sys.executable, "-c", SIGTERM_IN_SWAP, str(out), M], capture_output=True, text=True)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert sorted(os.listdir(out)) == ["new.txt", M]
    assert sorted(os.listdir(tmp_path)) == ["ck"]
