"""benchmarks/gpu/bench_mla_decode_q.py: bad input, and a machine without MLX's CUDA backend,
are one error line and exit 2 (the timings need the GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "bench_mla_decode_q.py"


@pytest.mark.parametrize("args", [["--contexts", "abc"], ["--contexts", "0"], ["--iters", "0"]])
def test_bad_input_is_one_line_and_exit_2(args):
    p = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
