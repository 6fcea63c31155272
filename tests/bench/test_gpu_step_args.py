"""Bad input to run_glm47_flash.sh's `tests` step and to benchmarks/mlx_lm_model_tests.py:
one `error:` line, exit 2, nothing written (no GPU or download needed to refuse)."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_tests_step_without_tests_is_one_line_and_exit_2(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")}
    cmd = ["bash", str(ROOT / "benchmarks/gpu/run_glm47_flash.sh"), "tests"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: STEP=tests needs TESTS (the pytest arguments, e.g. TESTS=tests/patch/test_moe_block.py)"
    ]
    assert not (tmp_path / "out").exists()


def test_the_tests_step_with_a_bad_workers_count_is_one_line_and_exit_2(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "TESTS": "tests", "WORKERS": "two"}
    cmd = ["bash", str(ROOT / "benchmarks/gpu/run_glm47_flash.sh"), "tests"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: WORKERS must be a positive integer, got 'two'"]
    assert not (tmp_path / "out").exists()


def test_mlx_lm_model_tests_refuses_an_unknown_pattern():
    script = ROOT / "benchmarks/mlx_lm_model_tests.py"
    p = subprocess.run([sys.executable, str(script), "--patterns", "nosuch"], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown pattern(s) in --patterns: nosuch")


@pytest.mark.skipif(mx.default_device() == mx.gpu, reason="a GPU is here: the script would run its checks")
def test_switch_checks_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    """benchmarks/gpu/switch_checks.sh on a machine without MLX's GPU backend: one `error:`
    line, exit 2, no results folder made."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OUT": str(tmp_path / "out")}
    p = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu/switch_checks.sh")], capture_output=True, text=True, env=env
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: switch_checks needs MLX's GPU backend (source benchmarks/gpu/env.sh first)"
    ]
    assert not (tmp_path / "out").exists()


def test_switch_checks_refuses_an_unknown_check_before_anything(tmp_path):
    """A check name it does not know: one `error:` line naming the known ones, exit 2, nothing
    run or made (on any machine)."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OUT": str(tmp_path / "out")}
    script = str(ROOT / "benchmarks/gpu/switch_checks.sh")
    p = subprocess.run(["bash", script, "qmm-order", "softmax"], capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: unknown check 'softmax' (mxfp4-fp-order, qmm-order, softmax-layers, gqa-prologue, oai-down, "
        "moe-block-compiled, mixtral-blocks, router-bias)"
    ]
    assert not (tmp_path / "out").exists()
