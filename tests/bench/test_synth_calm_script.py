"""benchmarks/synth_calm.py: a capsule of the reference -> bf16 divergence per preset; bad
input is one `error:` line and exit 2, before anything is built or written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "synth_calm.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_rows_go_to_a_capsule(tmp_path):
    r = _run("--specs", "tiny-calm", "--positions", "8", "--capsule-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    (path,) = tmp_path.glob("*_synth_calm.json")
    (row,) = json.loads(path.read_text())["variants"]
    assert row["name"] == "synth:glm4_moe_lite/tiny-calm/affine4" and row["layers"] == 4
    assert row["reference_vs_bf16"]["positions"] == 8


@pytest.mark.parametrize(
    "args,message",
    [
        (["--specs", "nope"], "unknown preset 'nope'"),
        (["--specs", " , "], "--specs names no preset"),
        (["--quant", "int3"], "unknown quantization 'int3'"),
        (["--positions", "1"], "--positions must be at least 2"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = _run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in r.stderr


def test_a_file_as_capsule_dir_is_refused_and_left_as_it_was(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("keep")
    r = _run("--capsule-dir", str(f))
    assert r.returncode == 2 and f"--capsule-dir {f} is not a directory" in r.stderr
    assert f.read_text() == "keep"
