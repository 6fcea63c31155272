"""benchmarks/kernel_source_bytes.py: the bytes each decode launch of a GLM-4.7-Flash layer
hands MLX, as written and compacted, into a capsule; bad input is one line and exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_source_bytes.py"


def _run(args, env=None):
    env = {k: v for k, v in os.environ.items() if k != "ZMLX_KERNEL_COMMENTS"} | (env or {})
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_counts_go_to_a_capsule(tmp_path):
    r = _run(["--capsule-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    (path,) = tmp_path.glob("*_kernel_source_bytes.json")
    variants = {v["name"]: v for v in json.loads(path.read_text())["variants"]}
    assert set(variants) == {"default", "fast"}
    for v in variants.values():
        assert all(0 < k["handed"] < k["written"] for k in v["kernels"])
        assert v["handed_per_layer"] == sum(k["handed"] for k in v["kernels"])
    assert len(variants["fast"]["kernels"]) == 7 and len(variants["default"]["kernels"]) == 5


@pytest.mark.parametrize(
    "args, env, says",
    [
        (["--capsule-dir", "FILE"], {}, "is not a directory"),
        ([], {"ZMLX_KERNEL_COMMENTS": "1"}, "unset ZMLX_KERNEL_COMMENTS"),
        ([], {"ZMLX_KERNEL_COMMENTS": "maybe"}, "ZMLX_KERNEL_COMMENTS='maybe'"),
        (["--bogus"], {}, "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, says):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    r = _run([str(a_file) if x == "FILE" else x for x in args], env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], r.stderr
    assert r.stdout == "" and a_file.read_text() == "mine\n"
