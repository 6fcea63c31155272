"""The `zmlx` command: `python -m zmlx`, --version, and every module's entry point as a
subcommand (drift included)."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from zmlx import __version__
from zmlx.cli import app


def test_version_names_zmlx_mlx_and_mlx_lm():
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == (f"zmlx {__version__} (mlx {version('mlx')}, mlx-lm {version('mlx-lm')})")


def test_every_entry_point_is_a_subcommand():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for sub in ("validate", "drift", "synth", "report", "patterns", "matrix"):
        assert sub in result.output


def test_drift_is_the_drift_tool():
    """`zmlx drift` is `python -m zmlx.bench.drift`: the same checks, the same result."""
    result = CliRunner().invoke(app, ["drift", "synth:glm4_moe_lite/tiny/affine4", "--perturb", "nan"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --perturb nan: must be a finite number >= 0"
    result = CliRunner().invoke(
        app, ["drift", "synth:glm4_moe_lite/tiny/affine4", "--steps", "1", "--prompt-tokens", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert '"argmax_equal": true' in result.stdout


def test_an_unknown_variable_is_one_warning_line(monkeypatch):
    from zmlx.patch import core

    monkeypatch.setattr(core, "_WARNED", set())
    monkeypatch.setenv("ZMLX_MOE_ROUTR", "1")
    result = CliRunner().invoke(
        app, ["drift", "synth:glm4_moe_lite/tiny/affine4", "--steps", "1", "--prompt-tokens", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.stderr.splitlines() if "ZMLX_MOE_ROUTR" in x]
    assert line.startswith(
        "warning: ZMLX_MOE_ROUTR is not a zmlx variable and is ignored "
        "(did you mean ZMLX_MOE_ROUTER?); pattern flags: "
    )
    assert "ZmlxWarning" not in result.stderr  # no file:line: Category: ... source-line pair


@pytest.mark.slow
def test_python_dash_m_zmlx_is_the_zmlx_command():
    p = subprocess.run(
        [sys.executable, "-m", "zmlx", "--version"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0 and p.stdout.startswith(f"zmlx {__version__} (mlx ")
    p = subprocess.run(
        [sys.executable, "-m", "zmlx", "drift", "synth:bogus"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "error: bad spec 'synth:bogus': use synth:FAMILY/PRESET/QUANT[@SEED]"
