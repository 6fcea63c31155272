"""benchmarks/gpu/run_distributed.sh (issue 21's two-GPU proof as one command per step), here on
the CPU: its input errors are one line and exit 2, DRY=1 prints the commands the GPU machine
will run, and BACKEND=ring runs the same steps over MLX's ring backend with a tiny model
(mlx.launch, two ranks on 127.0.0.1), so the printed commands are known to work."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "run_distributed.sh"
FLASH = "synth:glm4_moe_lite/flash/affine4"


def sh(tmp_path, *args: str, path_first: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """The script with `env` added, OUT under tmp_path, this interpreter's bin first on PATH
    (its python3 has zmlx and mlx), and `path_first` before that."""
    bindir = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in (path_first, bindir, os.environ.get("PATH", "")) if p)
    full = {k: v for k, v in os.environ.items() if not k.startswith("ZMLX_")}
    full.update(OUT=str(tmp_path / "out"), PATH=path, **env)
    for name in ("RUNS", "MODEL", "DRY", "BACKEND", "TESTS", "ACCURACY", "PROMPT", "TEST_LIMIT"):
        if name not in env:
            full.pop(name, None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=SCRIPT.parents[2],
    )


def commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.parametrize(
    "args, env, message",
    [
        ((), {}, "error: no step given; usage: run_distributed.sh"),
        (("bench",), {}, "error: unknown step 'bench'"),
        (("validate", "x"), {}, "error: TOKENS must be a positive integer, got 'x'"),
        (("validate",), {"RUNS": "0"}, "error: RUNS must be a positive integer, got '0'"),
        (("validate",), {"DRY": "yes"}, "error: DRY must be 0 or 1, got 'yes'"),
        (("validate",), {"BACKEND": "mpi"}, "error: BACKEND must be nccl or ring, got 'mpi'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, message):
    p = sh(tmp_path, *args, **env)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith(message) and p.stderr.count("\n") == 1, p.stderr


def test_an_nccl_step_on_one_gpu_is_refused(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\n[ \"$1\" = -L ] && echo 'GPU 0: NVIDIA H200 (UUID: a)'\necho 'NVIDIA H200'\n")
    smi.chmod(0o755)
    p = sh(tmp_path, "sharded", path_first=str(fake))
    assert p.returncode == 2 and p.stderr == "error: step sharded needs 2 GPUs, nvidia-smi lists 1\n"


def test_dry_run_prints_the_gpu_commands(tmp_path):
    out = tmp_path / "out"
    p = sh(tmp_path, "ledger", "128", DRY="1")
    assert p.returncode == 0, p.stderr
    sharded, single = commands(p.stdout)
    cut = sharded.index("--")
    assert sharded[cut - 4 : cut] == ["--backend", "nccl", "-n", "2"]
    matrix = ["python3", "-m", "zmlx.matrix", "run", FLASH, "--runs", "5", "--max-tokens", "128"]
    assert sharded[cut + 1 : cut + 10] == matrix and single[:9] == matrix
    for cmd in (sharded, single):
        assert cmd[cmd.index("--ledger") + 1] == str(out / "matrix.jsonl") and "--no-accuracy" in cmd
    assert "tensor parallel over 2 ranks (nccl)" in sharded[-1] and "one process" in single[-1]
    assert not (out / "matrix.jsonl").exists()  # nothing ran

    (validate,) = commands(sh(tmp_path, "validate", DRY="1", ACCURACY="1").stdout)
    assert validate[validate.index("--") + 1 :] == [
        *("python3", "-m", "zmlx.validate", FLASH, "--runs", "5", "--max-tokens", "200", "--accuracy"),
    ]
    (tests,) = commands(sh(tmp_path, "tests", DRY="1", TESTS="tests/distributed -k nccl").stdout)
    assert tests[:4] == ["env", "PYTHONUNBUFFERED=1", "timeout", "540"]
    assert tests[-3:] == ["tests/distributed", "-k", "nccl"]
    (tests,) = commands(sh(tmp_path, "tests", DRY="1").stdout)
    assert tests[-1] == "tests/distributed/test_sharded_nccl.py"  # the GPU's part; the ring tests are CI's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RING = pytest.mark.skipif(
    not mx.distributed.is_available("ring"), reason="MLX's ring backend is not available"
)
TINY = "synth:glm4_moe_lite/tiny/mxfp4"  # mxfp4's groups of 32 split the tiny experts over 2


@pytest.mark.slow
@RING
def test_ledger_over_ring_writes_the_sharded_and_the_single_line(tmp_path):
    """The ledger step's two commands, run: one line from the two-rank group (rank 0 only)
    and one from a single process, the same model and preset."""
    env = dict(BACKEND="ring", RING_PORT=str(_free_port()), MODEL=TINY, RUNS="1", PROMPT="8")
    p = sh(tmp_path, "ledger", "4", **env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "out" / "matrix.jsonl").read_text().splitlines()]
    assert [line.get("world_size", 1) for line in lines] == [2, 1]
    assert {line["fidelity"] for line in lines} == {"PASS"}
    assert lines[0]["patterns"] == lines[1]["patterns"]
    log = (tmp_path / "out" / "run-distributed-ledger-4.log").read_text()
    assert log.count("\n+ ") + log.startswith("+ ") == 2 and log.rstrip().endswith("done")


@pytest.mark.slow
@RING
def test_validate_over_ring_reports_once(tmp_path):
    env = dict(BACKEND="ring", RING_PORT=str(_free_port()), MODEL=TINY, RUNS="1")
    p = sh(tmp_path, "validate", "4", **env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("zmlx.validate:") == 1 and "PASS" in p.stdout
