"""`zmlx validate` and `zmlx matrix run` under a launcher (what `mlx.launch --backend ring` sets
up: MLX_RANK and a hostfile; two processes on 127.0.0.1): the model is split over the group
(tensor parallel), both ranks measure it, and only rank 0 prints the report or writes the
ledger line. A process started on its own never joins a distributed group
(zmlx.config.launched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from test_sharded import _free_ports  # the test directory is on sys.path (pytest)

from zmlx import config, distributed

SPEC = "synth:glm4_moe_lite/tiny/mxfp4"  # mxfp4's groups of 32 split the tiny experts over 2
ARGS = ["--runs", "1", "--max-tokens", "4", "--no-accuracy", "--patterns", "moe_router,moe_combine"]
RING = pytest.mark.skipif(
    not mx.distributed.is_available("ring"), reason="MLX's ring backend is not available"
)


def _two_ranks(tmp_path, cmd: list[str]) -> list[tuple[str, str]]:
    """Run `cmd` as ranks 0 and 1 of a ring group on 127.0.0.1; both must exit 0; their
    (stdout, stderr). Every process is ended in the finally."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(2)]))
    procs = []
    try:
        for rank in range(2):
            env = {k: v for k, v in os.environ.items() if not k.startswith("ZMLX_")}
            env.update(MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}: {err[-3000:]}"
    return outs


def test_only_a_launched_process_joins_a_group():
    assert not config.launched({}) and not config.launched({"MLX_RANK": " "})
    assert config.launched({"MLX_RANK": "0"})
    if not config.launched():
        assert distributed.world() is None


@RING
def test_validate_on_two_ranks_reports_once(tmp_path):
    outs = _two_ranks(tmp_path, [sys.executable, "-m", "zmlx.validate", SPEC, *ARGS, "--json"])
    report = json.loads(outs[0][0])
    assert report["verdict"] == "PASS" and report["patterns"] == ["moe_router", "moe_combine"]
    assert outs[1][0] == ""  # rank 1 validated too, silently


@RING
def test_matrix_run_on_two_ranks_writes_one_line(tmp_path):
    ledger = tmp_path / "m.jsonl"
    outs = _two_ranks(
        tmp_path, [sys.executable, "-m", "zmlx.matrix", "run", SPEC, *ARGS, "--ledger", str(ledger)]
    )
    (line,) = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert line["world_size"] == 2 and line["fidelity"] == "PASS"
    assert outs[1][0] == ""
