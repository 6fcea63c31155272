"""zmlx.distributed.load's two ways of splitting a checkpoint directory, in one process on any
machine (a group of one: no launcher): on MLX's CUDA backend it splits the checkpoint with
mlx-lm's load_model and shard() / pipeline() itself and waits for the other processes on the
GPU stream, because mlx-lm 0.32.2's sharded_load ends with an all-sum on the CPU stream, which
MLX's NCCL backend cannot run; on every other backend it calls sharded_load, as before.
`zmlx chat|server` (the tools' shim) hand mlx-lm's sharded_load calls to the same split there
(zmlx.distributed.gpu_safe). The CUDA branch is forced by making zmlx.backend.current answer
"cuda"."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm.utils
import pytest
from mlx_lm.utils import load

from zmlx import backend, synth
from zmlx.distributed import load as split_load

PROMPT = [[5, 17, 33, 71]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("load_on_cuda")
    return str(synth.write("synth:glm4_moe_lite/tiny/bf16", root / "glm4_moe_lite-bf16"))


def _same_as_unsharded(model, path: str) -> bool:
    # a group of one: shard() and pipeline() keep every head and layer, so the logits are
    # the unsharded model's (in float32: MLX's CPU gather_mm takes float32)
    ref = load(path)[0]
    for m in (model, ref):
        m.set_dtype(mx.float32)
    prompt = mx.array(PROMPT)
    return bool(mx.array_equal(model(prompt), ref(prompt)).item())


@pytest.mark.parametrize("pipeline", [False, True], ids=["tensor", "pipeline"])
def test_on_cuda_a_checkpoint_is_split_without_sharded_load(checkpoint, pipeline, monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("sharded_load was called on the CUDA branch")

    barriers = []
    all_sum = mx.distributed.all_sum

    def recorded(x, *args, **kwargs):
        barriers.append(kwargs)
        return all_sum(x, *args, **kwargs)

    monkeypatch.setattr(backend, "current", lambda: "cuda")
    monkeypatch.setattr(mlx_lm.utils, "sharded_load", refused)
    monkeypatch.setattr(mx.distributed, "all_sum", recorded)
    group = mx.distributed.init()
    assert group.size() == 1
    model, tokenizer, source = split_load(checkpoint, group, pipeline=pipeline)
    assert (source.kind, source.family, source.quantization) == ("path", "glm4_moe_lite", "bfloat16")
    assert tokenizer is not None
    # the barrier: an all-sum over the group on the default stream (none names the CPU's)
    assert barriers and barriers[0].get("group") is group
    assert all(kw.get("stream") is None for kw in barriers)
    monkeypatch.setattr(mx.distributed, "all_sum", all_sum)
    assert _same_as_unsharded(model, checkpoint)


def test_elsewhere_a_checkpoint_is_split_by_sharded_load(checkpoint, monkeypatch):
    calls = []
    real = mlx_lm.utils.sharded_load

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "current", lambda: "cpu")
    monkeypatch.setattr(mlx_lm.utils, "sharded_load", spy)
    group = mx.distributed.init()
    model, _, source = split_load(checkpoint, group)
    assert calls == [((checkpoint,), {"return_config": True, "tensor_group": group})]
    assert (source.kind, source.family, source.quantization) == ("path", "glm4_moe_lite", "bfloat16")
    assert _same_as_unsharded(model, checkpoint)


def test_on_cuda_a_pipeline_over_several_processes_is_refused_in_one_line(monkeypatch):
    """MLX's CUDA backend has no send/recv (on two H200s the first pipelined step failed with
    "Recv has no CUDA implementation"): the split is refused before any weight is read."""
    from zmlx.distributed import ShardError, _check

    model = synth.build("synth:glm4_moe_lite/tiny/bf16")[0]
    monkeypatch.setattr(backend, "current", lambda: "cuda")
    with pytest.raises(ShardError, match="tensor parallel instead") as e:
        _check(model, 2, pipeline=True)
    assert "\n" not in str(e.value)
    _check(model, 1, pipeline=True)  # a group of one sends nothing
    monkeypatch.setattr(backend, "current", lambda: "cpu")
    _check(model, 2, pipeline=True)  # the ring backend's send/recv run on the CPU


def test_on_cuda_mlx_lms_sharded_load_goes_through_zmlxs_split(checkpoint, monkeypatch):
    """`zmlx chat|server` under mlx.launch: mlx-lm's commands call sharded_load(repo,
    pipeline_group, tensor_group, ...). The tools' shim hands a local checkpoint on CUDA to
    zmlx's split (mlx-lm's own would fail under NCCL) and patches the result; on any other
    backend mlx-lm's own loader runs, with the arguments as given."""
    from zmlx import distributed, mlx_lm_tools

    calls = []

    def mlx_lms(*args, **kwargs):
        calls.append((args, kwargs))
        return load(args[0])

    class Tool:  # a command module: mlx-lm's chat imports sharded_load by name
        sharded_load = staticmethod(mlx_lms)

    group = mx.distributed.init()
    monkeypatch.setattr(backend, "current", lambda: "cuda")
    with mlx_lm_tools.patched_loaders(Tool, mlx_lm_tools.ToolOptions(patterns=("moe_router",))):
        model, tokenizer = Tool.sharded_load(checkpoint, None, group, trust_remote_code=False)
        _, _, config = Tool.sharded_load(checkpoint, None, group, return_config=True)
    assert calls == [] and config["model_type"] == "glm4_moe_lite" and tokenizer is not None
    import zmlx

    assert zmlx.is_patched(model)
    assert Tool.sharded_load is mlx_lms  # restored
    assert _same_as_unsharded(model, checkpoint)  # a group of one; moe_router is exact on the CPU
    monkeypatch.setattr(backend, "current", lambda: "cpu")
    wrapped = distributed.gpu_safe(mlx_lms)
    wrapped(checkpoint, None, group, trust_remote_code=True)
    assert calls == [((checkpoint, None, group, False), {"trust_remote_code": True})]
