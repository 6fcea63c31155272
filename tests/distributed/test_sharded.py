"""zmlx.patch on mlx-lm's sharded models, two processes on the loopback address over MLX's
ring backend: tensor parallel (`model.shard(group)`) and pipeline parallel
(`model.model.pipeline(group)`, via mlx-lm's sharded_load) of tiny glm4_moe_lite and
deepseek_v3 checkpoints (bf16, run in float32: MLX's CPU gather_mm takes float32; and
glm4_moe_lite in mxfp4, whose sharded linears are mlx's quantized ones).

One process pair per parallelism runs worker.py, which decodes greedily with the unsharded
stock model, the sharded stock model and the sharded model patched with each of its
selections (every pattern is in one). Proven here: the patched sharded model's tokens equal
the stock sharded model's and the unsharded model's; its logits are bitwise the stock
sharded model's wherever every applied pattern is exact on the CPU; pipeline-parallel stock
logits are bitwise the unsharded model's (each rank runs whole layers), tensor-parallel ones
are not (the all-sums add the ranks' partial products in another order); each pattern
patches or skips as the README's table says; and shard() / pipeline() on a patched model
raise one line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import mlx.core as mx
import pytest

from zmlx import synth

pytestmark = pytest.mark.skipif(
    not mx.distributed.is_available("ring"), reason="MLX's ring backend is not available in this build"
)

WORKER = Path(__file__).with_name("worker.py")
# family/quantization; mxfp4's groups of 32 split the tiny experts' width 64 over 2 (affine4's
# groups of 64 do not: zmlx.distributed.shard_reason), and moe_block takes mxfp4
CHECKPOINTS = ("glm4_moe_lite/bf16", "deepseek_v3/bf16", "glm4_moe_lite/mxfp4")
TIMEOUT_S = 240
ORDER = "unpatch, shard, then patch"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch(
    tmp: Path,
    args: list[str],
    size: int = 2,
    rank_env: Callable[[int], dict[str, str]] | None = None,
    timeout: float = TIMEOUT_S,
) -> dict:
    """Run worker.py as `size` ranks of one group on 127.0.0.1 with each rank's launcher
    settings `rank_env(rank)`; by default a ring group (what `mlx.launch --backend ring`
    sets up: MLX_RANK and a hostfile of one address per rank); returns rank 0's JSON.
    Every process is ended in the finally, whatever happened."""
    if rank_env is None:
        hostfile = tmp / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(size)]))

        def rank_env(rank: int) -> dict[str, str]:
            return {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}

    out = tmp / "out.json"
    procs = []
    try:
        for rank in range(size):
            env = {**os.environ, **rank_env(rank)}
            cmd = [sys.executable, str(WORKER), str(out), *args]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        logs = [p.communicate(timeout=timeout)[0].decode(errors="replace") for p in procs]
        for rank, (p, log) in enumerate(zip(procs, logs)):
            assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    for name in CHECKPOINTS:
        family, quant = name.split("/")
        out[name] = str(synth.write(f"synth:{family}/tiny/{quant}", root / f"{family}-{quant}"))
    return out


@pytest.fixture(scope="module", params=["tensor", "pipeline"])
def run(request, checkpoints, tmp_path_factory):
    mode = request.param
    out = launch(tmp_path_factory.mktemp(mode), [mode, *checkpoints.values()])
    assert out["size"] == 2
    return mode, {f: out["results"][p] for f, p in checkpoints.items()}, out["load"]


def test_tokens_equal_unsharded_and_stock_sharded(run):
    mode, results, _ = run
    for family, r in results.items():
        assert r["ranks_agree"], family
        assert r["sharded"] == r["unsharded"], (mode, family)
        assert len(set(r["unsharded"])) > 2, "degenerate decode proves nothing"
        # pipeline ranks run whole layers: bitwise; tensor parallel adds partial sums in another order
        assert r["sharded_bitwise_unsharded"] is (mode == "pipeline"), (mode, family)
        for selection, sel in r["patched"].items():
            assert sel["tokens"] == r["sharded"], (mode, family, selection)
            if sel["exact"]:
                assert sel["bitwise"], (mode, family, selection)


def test_shard_or_pipeline_after_patch_is_refused(run):
    mode, results, _ = run
    for family, r in results.items():
        for selection, sel in r["patched"].items():
            if sel["refused"] is not None:  # None: nothing was patched
                assert ORDER in sel["refused"], (mode, family, selection)


def _patterns(results: dict, family: str) -> dict:
    out: dict = {}
    for sel in results[family]["patched"].values():
        out.update(sel["patterns"])
    return out


def test_each_pattern_patches_or_skips_with_its_reason(run):
    mode, results, _ = run
    glm = _patterns(results, "glm4_moe_lite/bf16")
    # rank 0 holds layers 2 and 3 of 4 under pipeline parallelism (mlx-lm gives it the last ones)
    layers, moe_layers = (4, 3) if mode == "tensor" else (2, 2)
    for name in ("moe_router", "moe_combine", "downproj_combine", "moe_mlp"):
        assert glm[name]["patched"] == moe_layers, (mode, name)  # tensor parallel: all-sum after the combine
    for name in ("glm47_rope", "mla_attention", "mla_kv_quant"):
        assert glm[name]["patched"] == layers, (mode, name)  # num_heads per rank
    # the shared experts (sliced in place) and the dense layer (all-to-sharded gate and up)
    assert glm["swiglu_mlp"]["patched"] == layers
    assert glm["mla_block"]["patched"] == layers  # tensor parallel: q_b_proj's rows of this rank's heads
    assert glm["mla_prologue"]["patched"] == layers  # the same layers' check (zmlx.patch.mla_layer)
    if mode == "tensor":
        # moe_down adds a zero residual; the layer adds h after mlx-lm's all-sum
        assert glm["moe_block"]["patched"] == moe_layers
        # the dense layer's MLP: moe_down would add the residual before its down_proj's all-sum
        skipped = " ".join(glm["moe_block"]["skipped"])
        assert "tensor-parallel model: mlp.gate_proj is a AllToShardedLinear" in skipped
        assert glm["residual_norm"]["patched"] == 1 and glm["compiled_decode"]["patched"] == 1
    else:
        assert glm["moe_block"]["patched"] == layers
        for name in ("residual_norm", "compiled_decode"):
            assert glm[name]["patched"] == 0 and "pipeline-parallel" in " ".join(glm[name]["skipped"])
    q = _patterns(results, "glm4_moe_lite/mxfp4")  # mlx-lm's Quantized*ShardedLinear
    assert q["moe_block"]["patched"] == moe_layers and q["moe_combine"]["patched"] == moe_layers
    ds = _patterns(results, "deepseek_v3/bf16")
    assert ds["moe_combine"]["patched"] == moe_layers and ds["moe_mlp"]["patched"] == moe_layers
    # the attention patterns take DeepSeek-V3's YarnRoPE or say why not; every pattern reports
    assert all(p["patched"] or p["skipped"] for p in ds.values()), ds


def test_load_splits_a_checkpoint_or_a_spec_and_refuses_what_does_not_split(run):
    """zmlx.distributed.load, what the CLIs call under mlx.launch: the same tokens as mlx-lm's
    sharded_load of the checkpoint (and of the same model given as a synth spec); rank 0 is
    the primary process; tiny affine4 (the experts' width 64 is one group of 64) is refused
    in one line under tensor parallelism, split by layers under pipeline parallelism."""
    mode, results, load = run
    assert load["world"] == 2 and load["primary"] is True  # rank 0 wrote the file
    sharded = results["glm4_moe_lite/bf16"]["sharded"]
    assert load["path"] == sharded and load["synth"] == sharded and load["copy"] == sharded
    if mode == "tensor":
        assert load["refused"] == (
            "layer 1: experts' down_proj width 64 over 2 processes is not whole quantization groups of 64"
        )
    else:
        assert load["refused"] == ""
