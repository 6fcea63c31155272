"""Bad input to run_glm47_flash.sh's `tests` step and to benchmarks/mlx_lm_model_tests.py:
one `error:` line, exit 2, nothing written (no GPU or download needed to refuse)."""

import subprocess
import sys
from pathlib import Path

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
