"""The README quotes the ledger, not memory: each `<!-- ledger-report: ARGS -->` block is
exactly what `python -m zmlx.matrix report --ledger matrix.jsonl --markdown ARGS` prints."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zmlx.cli import matrix as matrix_cli

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- ledger-report:(?P<args>[^>]*)-->\n(?P<body>.*?)<!-- /ledger-report -->", re.S)


def _blocks():
    return [(m["args"].strip(), m["body"]) for m in BLOCK.finditer((ROOT / "README.md").read_text())]


def test_the_readme_has_a_ledger_block():
    assert _blocks(), "README.md should show its numbers through a ledger-report block"


@pytest.mark.parametrize("args,body", _blocks())
def test_each_readme_table_is_the_ledgers_report(args, body):
    result = CliRunner().invoke(
        matrix_cli.app, ["report", "--markdown", "--ledger", str(ROOT / "matrix.jsonl"), *shlex.split(args)]
    )
    assert result.exit_code == 0, result.output
    assert body == result.stdout, (
        f"README.md's ledger-report block ({args}) no longer matches matrix.jsonl: paste the output of "
        f"python -m zmlx.matrix report --ledger matrix.jsonl --markdown {args}"
    )
