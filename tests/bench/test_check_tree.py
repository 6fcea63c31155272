"""benchmarks/gpu/stamp.sh and check_tree.py: a stamped tree passes, an edited, missing or
unstamped one is refused with exit 2 and one line naming the file, and a dirty tree is not
stamped."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@t")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(bytes(range(256)) * 3)
    (tmp_path / ".gitignore").write_text("/.device/\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def stamp(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU / "stamp.sh")], cwd=repo, capture_output=True, text=True)


def check(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(GPU / "check_tree.py"), ".device/stamp"],
        cwd=repo,
        capture_output=True,
        text=True,
    )


def test_stamped_tree_passes_and_an_edit_is_refused(repo):
    assert stamp(repo).returncode == 0
    head = (repo / ".device" / "stamp" / "COMMIT").read_text().strip()
    ok = check(repo)
    assert ok.returncode == 0 and head[:10] in ok.stdout
    (repo / "sub" / "b.bin").write_bytes(b"other")
    bad = check(repo)
    assert bad.returncode == 2 and "sub/b.bin (differs)" in bad.stderr and "Traceback" not in bad.stderr
    (repo / "a.py").unlink()
    assert "a.py (missing)" in check(repo).stderr


def test_dirty_tree_is_not_stamped(repo):
    (repo / "a.py").write_text("x = 2\n")
    res = stamp(repo)
    assert res.returncode == 2 and "uncommitted" in res.stderr
    assert not (repo / ".device" / "stamp").exists()


def test_missing_stamp_is_one_line(repo):
    res = check(repo)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "stamp.sh" in res.stderr
