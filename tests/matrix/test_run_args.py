"""`matrix run` checks its arguments as validate and drift do (zmlx.cli.args): bad input is
one `error:` line and exit status 2, before anything is measured or written."""

import pytest
from typer.testing import CliRunner

from zmlx import backend
from zmlx.cli import matrix as matrix_cli

TINY = "synth:glm4_moe_lite/tiny/affine4"


def _refused(tmp_path, *args) -> str:
    ledger = tmp_path / "m.jsonl"
    result = CliRunner().invoke(matrix_cli.app, ["run", *args, "--ledger", str(ledger)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    assert not ledger.exists()  # nothing recorded
    return line


@pytest.mark.parametrize(
    "args,message",
    [
        (["synth:bogus"], "bad spec 'synth:bogus': use synth:FAMILY/PRESET/QUANT"),
        ([TINY, "--patterns", ","], "empty pattern list in --patterns (','): use none for no patterns"),
        ([TINY, "--patterns", "none,moe_router"], "none means no patterns"),
        ([TINY, "--patterns", "moe_rooter"], "unknown pattern(s) in --patterns: moe_rooter"),
        ([TINY, "--runs", "0"], "--runs 0: must be at least 1"),
        ([TINY, "--max-tokens", "0"], "--max-tokens 0: must be at least 1"),
        ([TINY, "--max-memory-gb", "nan"], "--max-memory-gb nan: must be a finite number > 0"),
        ([TINY, "--max-memory-gb", "-4"], "--max-memory-gb -4.0: must be a finite number > 0"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, args, message):
    assert message in _refused(tmp_path, *args)


def test_bad_environment_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ZMLX_EXCLUDE", ",")
    assert "empty pattern list in ZMLX_EXCLUDE" in _refused(tmp_path, TINY)


@pytest.mark.skipif(backend.current() != "cpu", reason="MLX's GPU backends run unquantized experts in bf16")
def test_a_model_mlx_cannot_run_here_is_one_line_with_the_hint(tmp_path):
    line = _refused(
        tmp_path, "synth:glm4_moe_lite/tiny/bf16", "--runs", "1", "--max-tokens", "2", "--no-count-kernels"
    )
    assert "MLX could not run synth:glm4_moe_lite/tiny/bf16 on cpu: [GatherMM::eval]" in line
    assert "use a quantized checkpoint" in line


def test_a_model_no_pattern_applies_to_is_refused_not_recorded_as_stock_vs_stock(tmp_path, llama_checkpoint):
    line = _refused(tmp_path, str(llama_checkpoint), "--runs", "1", "--max-tokens", "2", "--no-count-kernels")
    assert "nothing to measure" in line and "'llama' has no zmlx patterns" in line


@pytest.mark.parametrize(
    "command", [["history"], ["report"], ["supersede", "abc", "--reason", "x"], ["run", TINY]]
)
def test_a_ledger_that_is_a_directory_is_one_line_for_every_command(tmp_path, command):
    result = CliRunner().invoke(matrix_cli.app, [*command, "--ledger", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is a directory" in result.stderr.strip().splitlines()[-1]
