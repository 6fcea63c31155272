"""test_sharded.py's proof on two GPUs over NCCL (MLX's CUDA backend): worker.py as two ranks
on 127.0.0.1 with what `mlx.launch --backend nccl -n 2` sets per rank (NCCL_HOST_IP,
NCCL_PORT, MLX_WORLD_SIZE, MLX_RANK, CUDA_VISIBLE_DEVICES=<rank>), tensor and pipeline
parallel, for the tiny glm4_moe_lite and deepseek_v3 bf16 checkpoints. Pipeline parallelism
cannot run there: MLX's CUDA backend has no send/recv ("Recv has no CUDA implementation", two
H200s, MLX 0.32.4), so those cases are skipped and zmlx.distributed.load refuses the split in
one line (tests/distributed/test_load_on_cuda.py).

Proven there: the patched sharded model's tokens equal the stock sharded model's (both in
the model's bf16, what the patterns' CUDA kernels run) for every exact selection; a close
one (mla_block's attention, not bitwise on CUDA) must give the prompt's token, from the stock
prompt path, and its decode may part from stock's (on the H200, deepseek_v3's did with
mla_block + compiled_decode: random tiny models flip on small differences); its logits are bitwise the stock
sharded model's for the family's CUDA default preset (exact on CUDA); the stock sharded
model's tokens equal the unsharded model's (float32, as test_sharded compares them), its
logits bitwise under pipeline parallelism; the ranks agree. Skipped where MLX has no NCCL
backend or fewer than two GPUs are visible (found without touching a GPU). The stock sharded
models are built with mlx-lm's load_model and `shard()` / `pipeline()`, not its sharded_load
(worker.py), and zmlx.distributed.load splits a checkpoint so too on CUDA: mlx-lm 0.32.2's
sharded_load ends with an all-sum on the CPU stream, which NCCL cannot run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from argparse import Namespace

import mlx.core as mx
import pytest
from test_sharded import _free_ports, checkpoints, launch  # noqa: F401  (checkpoints: a fixture)

from zmlx.families import FAMILIES

NCCL_CHECKPOINTS = ("glm4_moe_lite/bf16", "deepseek_v3/bf16")
# two processes each load and decode every checkpoint several times, and the first process on
# a machine spends minutes in MLX's CUDA JIT
TIMEOUT_S = 540


def visible_gpus() -> int:
    """NVIDIA GPUs `nvidia-smi -L` lists (0 without the tool, or when it fails): a count that
    does not initialise CUDA in this process."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    if listed.returncode != 0:
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())


def nccl_skip_reason() -> str | None:
    if not mx.distributed.is_available("nccl"):
        return "MLX's NCCL backend is not available in this build"
    if (n := visible_gpus()) < 2:
        return f"two CUDA devices needed, {n} visible"
    return None


_why = nccl_skip_reason()
NCCL = pytest.mark.skipif(_why is not None, reason=_why or "")


def nccl_env(port: int):
    """Rank -> the launcher's NCCL settings for a two-rank group on 127.0.0.1, one GPU each."""

    def rank_env(rank: int) -> dict[str, str]:
        return {
            "NCCL_HOST_IP": "127.0.0.1",
            "NCCL_PORT": str(port),
            "MLX_WORLD_SIZE": "2",
            "MLX_RANK": str(rank),
            "CUDA_VISIBLE_DEVICES": str(rank),
        }

    return rank_env


@pytest.fixture(scope="module", params=["tensor", "pipeline"])
def run(request, checkpoints, tmp_path_factory):  # noqa: F811  (the imported fixture)
    mode = request.param
    if mode == "pipeline":
        pytest.skip("MLX's CUDA backend has no send/recv: pipeline parallelism cannot run over NCCL")
    paths = {name: checkpoints[name] for name in NCCL_CHECKPOINTS}
    (port,) = _free_ports(1)
    out = launch(
        tmp_path_factory.mktemp(f"nccl-{mode}"),
        [mode, *paths.values(), "--backend", "nccl"],
        rank_env=nccl_env(port),
        timeout=TIMEOUT_S,
    )
    assert out["size"] == 2 and out["backend"] == "nccl"
    return mode, {name: out["results"][p] for name, p in paths.items()}, out["load"]


@pytest.mark.cuda
@NCCL
def test_patched_tokens_equal_stock_sharded_and_unsharded(run):
    mode, results, _ = run
    for name, r in results.items():
        assert r["ranks_agree"], (mode, name)
        assert r["sharded"] == r["unsharded"], (mode, name)  # float32
        assert len(set(r["unsharded"])) > 2, "degenerate decode proves nothing"
        if mode == "pipeline":  # each rank runs whole layers
            assert r["sharded_bitwise_unsharded"], name
        for selection, sel in r["patched"].items():
            if sel["exact"]:
                assert sel["tokens"] == r["native"], (mode, name, selection)  # bf16
            else:
                assert sel["tokens"][0] == r["native"][0], (mode, name, selection)
                assert len(sel["tokens"]) == len(r["native"]), (mode, name, selection)


@pytest.mark.cuda
@NCCL
def test_cuda_preset_is_bitwise_stock_sharded(run):
    mode, results, _ = run
    for name, r in results.items():
        family = name.split("/")[0]
        preset = ",".join(FAMILIES[family].preset_on("cuda"))
        sel = r["patched"][preset]
        assert any(p["patched"] for p in sel["patterns"].values()), (mode, name, sel["patterns"])
        assert sel["bitwise"], (mode, name, preset)


@pytest.mark.cuda
@NCCL
def test_shard_after_patch_is_refused_and_load_splits(run):
    mode, results, load = run
    for name, r in results.items():
        for selection, sel in r["patched"].items():
            if sel["refused"] is not None:
                assert "unpatch, shard, then patch" in sel["refused"], (mode, name, selection)
    assert load["world"] == 2 and load["primary"] is True
    sharded = results["glm4_moe_lite/bf16"]["sharded"]
    assert load["path"] == sharded and load["synth"] == sharded and load["copy"] == sharded


# ---------------------------------------------------------------- here, without a GPU


def test_rank_env_is_what_mlx_launch_sets(monkeypatch):
    """nccl_env gives each rank the settings MLX's launcher gives it for `mlx.launch --backend
    nccl -n 2` on this host (its launch_nccl, with the processes' start replaced; MLX_RANK is
    added by the launch script it writes)."""
    launch_mod = pytest.importorskip("mlx._distributed_utils.launch")
    started = []
    monkeypatch.setattr(launch_mod, "_launch_with_io", lambda _cls, ranks, _verbose: started.extend(ranks))
    hosts = launch_mod.Hostfile.from_list("127.0.0.1", 2).hosts
    args = Namespace(nccl_port=41234, env=[], cwd=None, verbose=False, python=None, repeat_hosts=2)
    launch_mod.launch_nccl(None, hosts, args, ["python3", "worker.py"])
    assert len(started) == 2
    for (rank, host, *_, env, _command), _ in started:
        assert host == "127.0.0.1"
        launcher = dict(e.split("=", 1) for e in env) | {"MLX_RANK": str(rank)}
        assert launcher == nccl_env(41234)(rank)


def _fake_smi(tmp_path, monkeypatch, script: str) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{script}\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_visible_gpus_counts_what_nvidia_smi_lists(tmp_path, monkeypatch):
    listing = "echo 'GPU 0: NVIDIA H200 (UUID: a)'; echo '  MIG 1g (UUID: b)'; echo 'GPU 1: x'"
    _fake_smi(tmp_path, monkeypatch, listing)
    assert visible_gpus() == 2
    _fake_smi(tmp_path, monkeypatch, "echo 'GPU 0: x'; exit 9")  # no driver: it fails
    assert visible_gpus() == 0
    monkeypatch.setenv("PATH", os.devnull)  # no tool
    assert visible_gpus() == 0
