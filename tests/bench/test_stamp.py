"""What a record says about the measured code: the commit, and whether the tree was dirty."""

import subprocess

import pytest

from zmlx.bench import stamp


def _git(root, *args):
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv("ZMLX_GIT_COMMIT", raising=False)
    monkeypatch.delenv("ZMLX_GIT_DIRTY", raising=False)
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    (root / "a.txt").write_text("1")
    _git(root, "add", "a.txt")
    _git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one")
    return root


def test_a_checkout_says_its_commit_and_state(repo):
    head = _git(repo, "rev-parse", "HEAD")
    assert stamp.git(repo) == {"commit": head, "dirty": False}
    (repo / "a.txt").write_text("2")
    assert stamp.git(repo) == {"commit": head, "dirty": True}


def test_a_stated_commit_must_exist_where_the_checkout_is(repo, monkeypatch):
    head = _git(repo, "rev-parse", "HEAD")
    monkeypatch.setenv("ZMLX_GIT_COMMIT", head[:7])
    assert stamp.git(repo) == {"commit": head, "dirty": False}  # resolved to the full sha
    monkeypatch.setenv("ZMLX_GIT_COMMIT", "0123456789abcdef")
    with pytest.raises(stamp.GitStateError, match="is not a commit"):
        stamp.git(repo)
    assert stamp.commit_exists(head, repo) is True and stamp.commit_exists("0123456", repo) is False


def test_without_a_checkout_unknown_stays_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv("ZMLX_GIT_DIRTY", raising=False)
    monkeypatch.delenv("ZMLX_GIT_COMMIT", raising=False)
    assert stamp.git(tmp_path) == {"commit": None, "dirty": None}
    monkeypatch.setenv("ZMLX_GIT_COMMIT", "abc1234")
    assert stamp.git(tmp_path) == {"commit": "abc1234", "dirty": None}  # not False: nobody looked
    monkeypatch.setenv("ZMLX_GIT_DIRTY", "0")
    assert stamp.git(tmp_path) == {"commit": "abc1234", "dirty": False}
    assert stamp.commit_exists("abc1234", tmp_path) is None
