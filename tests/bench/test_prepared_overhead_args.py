"""benchmarks/bench_prepared_overhead.py's bad input: one `error:` line on stderr and exit 2
before anything is measured, never argparse's usage block or a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_prepared_overhead.py"


@pytest.mark.parametrize(
    "args, env, says",
    [
        (["--calls", "0"], {}, "must be at least 1"),
        (["--calls", "x"], {}, "invalid int value"),
        (["--capsule-dir", "FILE"], {}, "is not a directory"),
        (["--calls", "1", "--repeats", "1"], {"ZMLX_GIT_COMMIT": "zzzz"}, "ZMLX_GIT_COMMIT=zzzz"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, says):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    args = [str(a_file) if x == "FILE" else x for x in args]
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], r.stderr
    assert r.stdout == "" and a_file.read_text() == "mine\n"  # nothing measured, the file kept
