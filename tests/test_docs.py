"""The documents a newcomer reads stay usable: the README (also the package's long description)
points nowhere outside the repository, STATUS.md stays short, and every ledger line id the two
quote is a current line of matrix.jsonl (not superseded, not invented)."""

import re
from pathlib import Path

import pytest

from zmlx.matrix import ledger

ROOT = Path(__file__).resolve().parents[1]
STATUS_MAX_LINES = 100
OUTSIDE = re.compile(r"https?://|(?<![\w.])\.\./")  # a URL, or a path that leaves the repository
LINK = re.compile(r"\]\(([^)\s]+)\)")  # a Markdown link's target
LINE_ID = re.compile(r"`([0-9a-f]{10})`")  # a ledger line id, as documents quote it


def _link_leaves_repository(target: str) -> bool:
    path = target.split("#")[0]
    return bool(path) and (path.startswith(("/", "~")) or not (ROOT / path).exists())


def outside_references(text: str) -> list[str]:
    """'N: line' for each line of `text` that points outside the repository: a URL, a `../`
    path, or a Markdown link whose target is not a file of the repository."""
    return [
        f"{n}: {line.strip()}"
        for n, line in enumerate(text.splitlines(), 1)
        if OUTSIDE.search(line) or any(_link_leaves_repository(t) for t in LINK.findall(line))
    ]


def stale_line_ids(text: str) -> set[str]:
    """The ledger line ids quoted in `text` that are not current lines of matrix.jsonl."""
    lines = ledger.read(ROOT / "matrix.jsonl")
    return set(LINE_ID.findall(text)) - {ledger.line_id(e) for e in lines.current()}


def test_readme_points_nowhere_outside_the_repository():
    bad = outside_references((ROOT / "README.md").read_text())
    why = "README.md is the package's long description; it may not point outside the repository"
    assert not bad, why + ":\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "text",
    [
        "see [mlx-lm](https://github.com/ml-explore/mlx-lm)",
        "plain http://example.org",
        "the device notes in `../shared/device/README.md`",
        "a [link](docs/missing.md) to nothing",
        "a [link](/etc/hosts) to the machine",
    ],
)
def test_outside_references_are_found(text):
    assert outside_references(text)


@pytest.mark.parametrize(
    "text",
    [
        "mlx-lm, plain",
        "`benchmarks/README.md` and [the status](STATUS.md)",
        "[a section](#usage)",
        "the user's ledger, `~/.cache/zmlx/matrix.jsonl`",
        "a file name such as `run..log`",
    ],
)
def test_references_inside_the_repository_pass(text):
    assert not outside_references(text)


def test_status_is_short():
    lines = (ROOT / "STATUS.md").read_text().splitlines()
    assert len(lines) <= STATUS_MAX_LINES, (
        f"STATUS.md has {len(lines)} lines (at most {STATUS_MAX_LINES}): move history to CHANGELOG.md "
        "or benchmarks/NOTEBOOK.md"
    )


@pytest.mark.parametrize("name", ["STATUS.md", "README.md"])
def test_quoted_ledger_lines_are_current(name):
    text = (ROOT / name).read_text()
    assert LINE_ID.search(text), f"{name} should name the ledger lines its numbers come from"
    stale = stale_line_ids(text)
    assert not stale, (
        f"{name} quotes ledger lines that are superseded or not in matrix.jsonl: {sorted(stale)} "
        "(python -m zmlx.matrix report --ledger matrix.jsonl lists the current ones)"
    )


def test_a_superseded_or_unknown_line_is_stale():
    superseded = sorted(ledger.read(ROOT / "matrix.jsonl").superseded)
    assert superseded, "matrix.jsonl should hold a supersede mark for this check to mean anything"
    assert stale_line_ids(f"`{superseded[0]}` and `0123456789`") == {superseded[0], "0123456789"}
