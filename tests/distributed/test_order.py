"""Patching order and bad set-ups of sharded runs, in one process (no ring group needed):
shard() / pipeline() on a patched model raise one line, unpatch gives the methods back,
and `shard_reason` says in one line why a model cannot be split over N processes."""

from __future__ import annotations

import pickle

import mlx.core as mx
import mlx.nn as nn
import pytest

import zmlx
from zmlx import synth
from zmlx.distributed import ORDER, ShardError, check_shardable, shard_reason


@pytest.fixture(scope="module")
def tiny():
    model, _ = synth.build("synth:glm4_moe_lite/tiny/affine4")
    return model


def test_shard_and_pipeline_of_a_patched_model_raise_one_line(tiny):
    group = mx.distributed.init()  # a group of one process: shard() would run, and change nothing visible
    zmlx.patch(tiny, patterns="moe_router")
    try:
        for call in (lambda: tiny.shard(group), lambda: tiny.model.pipeline(group)):
            with pytest.raises(ShardError) as e:
                call()
            assert ORDER in str(e.value) and "\n" not in str(e.value)
        copy = pickle.loads(pickle.dumps(tiny))  # the guard pickles with the model
        with pytest.raises(ShardError):
            copy.shard(group)
    finally:
        zmlx.unpatch(tiny)
    assert "shard" not in vars(tiny) and "pipeline" not in vars(tiny.model)
    assert tiny.shard.__func__ is type(tiny).shard
    assert tiny.model.pipeline.__func__ is type(tiny.model).pipeline


def test_a_model_nothing_patched_keeps_its_methods(tiny):
    result = zmlx.patch(tiny, patterns="none")
    assert result.patched_modules == 0
    assert "shard" not in vars(tiny)


def test_shard_reason(tiny):
    assert shard_reason(tiny, 1) is None
    # mlx-lm's shard() does not check the heads (num_heads //= N); on this model it raises for
    # the dense MLP's width 256 first, as a traceback from inside mlx.nn's shard_linear
    assert shard_reason(tiny, 3) == "layer 0: 4 attention heads do not split over 3 processes"
    # mlx-lm's shard_inplace raises deep in mx.split: the experts' width 64 is one group of 64
    assert shard_reason(tiny, 2) == (
        "layer 1: experts' down_proj width 64 over 2 processes is not whole quantization groups of 64"
    )
    with pytest.raises(ShardError, match="do not split over 3 processes"):
        check_shardable(tiny, 3)


def test_shard_reason_of_unquantized_and_unshardable_models():
    f32, _ = synth.build("synth:glm4_moe_lite/tiny/bf16")
    assert shard_reason(f32, 2) is None and shard_reason(f32, 4) is None
    why = shard_reason(nn.Linear(2, 2), 2)
    assert why == "model type 'Linear' has no tensor parallelism in mlx-lm (no shard() method)"


def test_load_refuses_a_model_type_without_sharding_in_one_line():
    from zmlx.distributed import load

    group = mx.distributed.init()  # one process: the model type is checked all the same
    with pytest.raises(ShardError) as e:
        load("synth:mixtral/tiny/bf16", group)
    assert str(e.value) == "model type 'mixtral' has no tensor parallelism in mlx-lm (no shard() method)"
    with pytest.raises(ShardError, match="^model type 'mixtral' has no pipeline parallelism in mlx-lm"):
        load("synth:mixtral/tiny/bf16", group, pipeline=True)


def test_load_of_one_process_is_the_model(tiny):
    from zmlx.distributed import load, primary, world

    assert world() is None and primary(None)  # not started by mlx.launch
    model, _, source = load("synth:glm4_moe_lite/tiny/affine4", mx.distributed.init())
    assert source.family == "glm4_moe_lite"
    prompt = mx.array([[5, 17, 33]])
    assert mx.array_equal(model(prompt), tiny(prompt)).item()
