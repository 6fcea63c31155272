"""`matrix run --emulate-metal`: the kernels' Metal bodies emulated on the CPU, recorded as
metal-emulated (never as a Metal device), refused in one line where it cannot run."""

import pytest
from typer.testing import CliRunner

from zmlx import backend
from zmlx.cli import matrix as matrix_cli
from zmlx.kernels import metal_emu
from zmlx.matrix import ledger as L

TINY = "synth:glm4_moe_lite/tiny/affine4"


def _run(ledger, *args):
    return CliRunner().invoke(
        matrix_cli.app,
        ["run", TINY, "--emulate-metal", "--runs", "1", "--max-tokens", "4", *args, "--ledger", str(ledger)],
    )


@pytest.mark.parametrize(
    "where,message",
    [
        ("cuda", "--emulate-metal: the Metal emulation runs on MLX's CPU backend (this is cuda)"),
        ("no g++", "--emulate-metal: the Metal emulation needs g++"),
    ],
)
def test_it_is_refused_in_one_line_where_it_cannot_run(tmp_path, monkeypatch, where, message):
    if where == "cuda":
        monkeypatch.setattr(backend, "current", lambda: "cuda")
    else:
        monkeypatch.setattr(metal_emu, "available", lambda: False)
    ledger = tmp_path / "m.jsonl"
    result = _run(ledger)
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {message}")
    assert not ledger.exists() and backend.emulated() is None


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_the_line_says_metal_emulated_and_which_bodies_ran(tmp_path):
    ledger = tmp_path / "m.jsonl"
    result = _run(ledger, "--patterns", "moe_mlp,downproj_combine", "--no-accuracy", "--notes", "ci")
    assert result.exit_code == 0, result.output
    (line,) = L.read(ledger).entries
    assert line["device"]["backend"] == "metal-emulated"  # never "metal": no preset may count it
    assert line["device"]["name"].startswith("metal-emulated on cpu")
    assert line["notes"] == "ci; Metal bodies emulated on the CPU (tok/s are the emulation's)"
    for name in ("moe_mlp", "downproj_combine"):
        assert line["pattern_paths"][name]["path"] == "kernel"
        assert line["pattern_paths"][name]["backend"] == "metal"
    assert backend.current() == "cpu" and backend.emulated() is None  # ended with the command
