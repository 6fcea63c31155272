"""moe_block on a softmax-routed MoE layer (Qwen3-MoE): residual_norm, mlx-lm's gate module,
softmax_router, moe_mlp and moe_down at decode. On the CPU the launches run their
references, which must be mlx-lm's own layer bitwise (compared with the unpatched model)."""

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import pytest
from block_helpers import patched_run, same
from test_family_exactness import _check_bitwise, build

from zmlx.families import FAMILIES
from zmlx.fidelity import greedy_logits
from zmlx.patch import PATTERNS
from zmlx.patch.patterns import moe_block

pytestmark = pytest.mark.usefixtures("blocks_on_the_cpu", "softmax_layers")

SOFTMAX = "residual_norm, softmax_router, moe_mlp, moe_down"
DENSE = "residual_norm, swiglu_mlp, moe_down"
PARAMS = dict(FAMILIES["qwen3_moe"].targets["moe_block"].params)


def _prompt(batch: int) -> mx.array:
    return mx.random.randint(1, 512, (batch, 6), key=mx.random.key(batch))


@pytest.fixture
def softmax_layers(monkeypatch):
    """moe_block takes the softmax-routed layers (off by default until this file's cuda test
    runs on a GPU)."""
    monkeypatch.setattr(moe_block, "SOFTMAX_LAYERS", True)


def test_off_by_default_the_softmax_layers_say_why(qwen3, monkeypatch):
    monkeypatch.setattr(moe_block, "SOFTMAX_LAYERS", False)
    why = PATTERNS["moe_block"].check(qwen3.model.layers[1], PARAMS)
    assert why == "softmax-routed MoE layers wait for their cuda test (moe_block.SOFTMAX_LAYERS)"
    assert PATTERNS["moe_block"].check(qwen3.model.layers[0], PARAMS) is None  # the dense layer


@pytest.fixture(scope="module")
def qwen3():
    return build("qwen3_moe")  # layer 0 dense, the others MoE with a softmax router


def _paths(plans, batch: int) -> list[str]:
    """Each layer's decode plan for one step of `batch` sequences, as "kernel"/"reference: ..."."""
    key = next(k for k in plans[0] if k[0][0] == batch)
    return [p[key].split(" (")[0] for p in plans]


@pytest.mark.parametrize("batch", [1, 2])
def test_the_softmax_moe_layers_run_the_block_bitwise_mlx_lm(qwen3, batch):
    stock = greedy_logits(qwen3, _prompt(batch), 3)
    result, patched, plans = patched_run(moe_block, qwen3, _prompt(batch), 3)
    assert result.patterns["moe_block"].skipped == []
    assert _paths(plans, batch) == [f"reference: {DENSE}"] + [f"reference: {SOFTMAX}"] * (len(plans) - 1)
    assert same(stock, patched)


def test_with_the_family_preset_the_block_runs_decode_bitwise(qwen3):
    preset = FAMILIES["qwen3_moe"].preset_on("cuda")
    assert "moe_block" in preset
    stock = greedy_logits(qwen3, _prompt(1), 3)
    _, patched, plans = patched_run(moe_block, qwen3, _prompt(1), 3, patterns=preset)
    assert _paths(plans, 1)[1:] == [f"reference: {SOFTMAX}"] * (len(plans) - 1)
    assert same(stock, patched)


def test_the_comparison_sees_the_routing_off_by_a_rounding(qwen3, monkeypatch):
    """The same comparison fails when the router's scores are off by one bf16 step: the
    patched decode really routes through the block's softmax_router launch."""
    stock = greedy_logits(qwen3, _prompt(1), 2)
    ref = moe_block.softmax_router.reference

    def off(*a, **k):
        inds, scores = ref(*a, **k)
        return inds, scores * (1 + 2**-7)

    monkeypatch.setattr(
        moe_block, "softmax_router", dataclasses.replace(moe_block.softmax_router, reference=off)
    )
    _, patched, _ = patched_run(moe_block, qwen3, _prompt(1), 2)
    assert not same(stock, patched)


def test_a_new_gate_is_prepared_again():
    """The prepared block holds the gate module's arrays: quantizing the gate after a decode
    step prepares the layer again, and the output is the new gate's (stock's, bitwise)."""
    model = build("qwen3_moe", quant="float32")
    _, _, plans = patched_run(moe_block, model, _prompt(1), 2)
    layer = model.model.layers[1]
    nn.quantize(layer.mlp, group_size=64, bits=8, class_predicate=lambda p, m: p == "gate")
    assert isinstance(layer.mlp.gate, nn.QuantizedLinear)
    stock = greedy_logits(model, _prompt(1), 2)
    _, patched, again = patched_run(moe_block, model, _prompt(1), 2)
    assert same(stock, patched)
    weights = moe_block._BLOCKS[id(layer)][1]
    assert all(w[0][1] is layer.mlp.gate["weight"] for w in weights.values())


def test_the_check_takes_a_softmax_block_only_with_the_family_routing(qwen3):
    layer = qwen3.model.layers[1]
    check = PATTERNS["moe_block"].check
    assert check(layer, PARAMS) is None
    assert check(layer, {}).startswith("router is a QuantizedLinear: softmax routing")  # no family data
    gate = layer.mlp["gate"]
    try:
        layer.mlp["gate"] = nn.Identity()
        assert check(layer, PARAMS) == "a softmax-routed block without a Linear gate"
    finally:
        layer.mlp["gate"] = gate
    top_k = layer.mlp.top_k
    try:
        del layer.mlp.top_k
        assert check(layer, PARAMS).startswith("a softmax-routed block without its routing's attributes")
    finally:
        layer.mlp.top_k = top_k


@pytest.mark.cuda
def test_on_the_gpu_every_moe_layer_runs_its_kernels_bitwise_mlx_lm():
    """One sequence: each MoE layer's four launches are the fused kernels (no reference, no
    mlx-lm fallback) and the logits are stock's."""
    mx.set_default_device(mx.gpu)  # blocks_on_the_cpu puts the CPU back afterwards
    model = build("qwen3_moe", cuda_widths=True)
    stock = greedy_logits(model, _prompt(1), 4)
    result, patched, plans = patched_run(moe_block, model, _prompt(1), 4)
    assert result.patterns["moe_block"].path == "kernel", result.patterns["moe_block"].fallbacks
    assert _paths(plans, 1) == [f"kernel: {DENSE}"] + [f"kernel: {SOFTMAX}"] * (len(plans) - 1)
    assert same(stock, patched)


@pytest.mark.cuda
def test_on_the_gpu_the_family_preset_with_the_block_is_bitwise_stock():
    """test_family_cuda_presets' check of Qwen3-MoE's CUDA preset (prompts and decode, batch
    1 and 2, with and without a cache) with moe_block taking the MoE layers."""
    mx.set_default_device(mx.gpu)
    _check_bitwise(
        build("qwen3_moe", cuda_widths=True), FAMILIES["qwen3_moe"].preset_on("cuda"), stock_twice=True
    )
