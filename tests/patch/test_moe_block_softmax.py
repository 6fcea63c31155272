"""moe_block on the softmax-routed MoE layers (zmlx.patch.softmax_layer): Qwen3-MoE's
(residual_norm, mlx-lm's gate module, softmax_router, moe_mlp, moe_down) and gpt-oss's (the
same to moe_mlp, then mlx-lm's biased down projection, sum and add) at decode. On the CPU the
launches run their references, which must be mlx-lm's own layer bitwise (compared with the
unpatched model, never with a copy of the pattern)."""

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import pytest
from block_helpers import patched_run, same
from test_family_exactness import APPLIES, _check_bitwise, build

import zmlx
from zmlx import synth
from zmlx.families import FAMILIES
from zmlx.fidelity import greedy_logits
from zmlx.patch import PATTERNS
from zmlx.patch.patterns import moe_block

pytestmark = pytest.mark.usefixtures("blocks_on_the_cpu", "softmax_layers")

FAMILY_NAMES = ("qwen3_moe", "gpt_oss")
DENSE = "residual_norm, swiglu_mlp, moe_down"
# family -> each layer's launches (the tiny models: Qwen3-MoE's layer 0 is dense)
LAYERS = {
    "qwen3_moe": lambda n: [DENSE] + ["residual_norm, softmax_router, moe_mlp, moe_down"] * (n - 1),
    "gpt_oss": lambda n: ["residual_norm, softmax_router, moe_mlp, moe_down"] * n,
}
MOE_LAYER = {"qwen3_moe": 1, "gpt_oss": 0}
OFF = "softmax-routed MoE layers wait for their cuda test (moe_block.SOFTMAX_LAYERS)"


def _params(family: str) -> dict:
    return dict(FAMILIES[family].targets["moe_block"].params)


def _prompt(batch: int) -> mx.array:
    return mx.random.randint(1, 512, (batch, 6), key=mx.random.key(batch))


def _paths(plans, batch: int) -> list[str]:
    """Each layer's decode plan for one step of `batch` sequences, less its reason."""
    key = next(k for k in plans[0] if k[0][0] == batch)
    return [p[key].split(" (")[0] for p in plans]


@pytest.fixture
def softmax_layers(monkeypatch):
    """moe_block takes the softmax-routed layers (its switch, on by default, forced on here so
    that this file checks the block whatever the default), and the family tests' APPLIES says so."""
    monkeypatch.setattr(moe_block, "SOFTMAX_LAYERS", True)
    monkeypatch.setitem(APPLIES, "gpt_oss", APPLIES["gpt_oss"] | {"moe_block"})


@pytest.fixture(scope="module")
def models():
    return {family: build(family) for family in FAMILY_NAMES}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_off_by_default_the_softmax_layers_say_why(models, family, monkeypatch):
    monkeypatch.setattr(moe_block, "SOFTMAX_LAYERS", False)
    layers = models[family].model.layers
    assert PATTERNS["moe_block"].check(layers[MOE_LAYER[family]], _params(family)) == OFF
    if family == "qwen3_moe":
        assert PATTERNS["moe_block"].check(layers[0], _params(family)) is None  # the dense layer


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("batch", [1, 2])
def test_the_softmax_moe_layers_run_the_block_bitwise_mlx_lm(models, family, batch):
    model = models[family]
    stock = greedy_logits(model, _prompt(batch), 3)
    result, patched, plans = patched_run(moe_block, model, _prompt(batch), 3)
    assert result.patterns["moe_block"].skipped == []
    assert _paths(plans, batch) == [f"reference: {n}" for n in LAYERS[family](len(plans))]
    assert same(stock, patched)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_with_the_family_preset_every_case_is_bitwise(models, family):
    """test_family_exactness's comparison (prompts and decode, batch 1 and 2, with and without
    a cache) of the family's CUDA preset, which holds moe_block, here on its references."""
    preset = FAMILIES[family].preset_on("cuda")
    assert "moe_block" in preset
    _check_bitwise(models[family], preset)


def test_gpt_oss_mxfp4_experts_run_the_block_bitwise():
    """gpt-oss's experts as released (mxfp4): moe_mlp's mxfp4 overload, the rest mlx-lm's."""
    model, _ = synth.build("synth:gpt_oss/tiny/mxfp4")
    prompt = mx.array([[3, 14, 15, 92, 65]])
    stock = greedy_logits(model, prompt, 3)
    _, patched, plans = patched_run(moe_block, model, prompt, 3)
    assert _paths(plans, 1) == [f"reference: {n}" for n in LAYERS["gpt_oss"](len(plans))]
    assert same(stock, patched)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_comparison_sees_the_routing_off_by_a_rounding(models, family, monkeypatch):
    """The same comparison fails when the router's scores are off by one bf16 step: the
    patched decode really routes through the block's softmax_router launch."""
    stock = greedy_logits(models[family], _prompt(1), 2)
    ref = moe_block.softmax_router.reference

    def off(*a, **k):
        inds, scores = ref(*a, **k)
        return inds, scores * (1 + 2**-7)

    routing = dataclasses.replace(moe_block.softmax_router, reference=off)
    monkeypatch.setattr(moe_block.softmax_layer, "softmax_router", routing)
    _, patched, _ = patched_run(moe_block, models[family], _prompt(1), 2)
    assert not same(stock, patched)


@pytest.mark.parametrize("family,gate", [("qwen3_moe", "gate"), ("gpt_oss", "router")])
def test_a_new_gate_is_prepared_again(family, gate):
    """The prepared block holds the gate module's arrays: quantizing the gate after a decode
    step prepares the layer again, and the output is the new gate's (stock's, bitwise)."""
    model = build(family, quant="float32")
    layer = model.model.layers[MOE_LAYER[family]]
    zmlx.patch(model, patterns=["moe_block"])
    try:
        greedy_logits(model, _prompt(1), 2)
        nn.quantize(layer.mlp, group_size=64, bits=8, class_predicate=lambda p, m: p == gate)
        assert isinstance(layer.mlp[gate], nn.QuantizedLinear)
        patched = greedy_logits(model, _prompt(1), 2)
        entries = moe_block._BLOCKS[id(layer)][1]  # before unpatch, which lets them go
        assert entries and all(w[0][1] is layer.mlp[gate]["weight"] for w in entries.values())
    finally:
        zmlx.unpatch(model)
    assert same(greedy_logits(model, _prompt(1), 2), patched)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_check_takes_a_softmax_block_only_with_the_family_routing(models, family):
    layer = models[family].model.layers[MOE_LAYER[family]]
    check, params = PATTERNS["moe_block"].check, _params(family)
    assert check(layer, params) is None
    assert check(layer, {}) is not None  # without the family data: the sigmoid router's checks
    gate, _, _ = moe_block.softmax_layer.parts(layer.mlp)
    name = "router" if family == "gpt_oss" else "gate"
    try:
        layer.mlp[name] = nn.Identity()
        assert check(layer, params) == "a softmax-routed block without a Linear gate"
    finally:
        layer.mlp[name] = gate
    attr = "num_experts_per_tok" if family == "gpt_oss" else "top_k"
    k = getattr(layer.mlp, attr)
    try:
        delattr(layer.mlp, attr)
        assert check(layer, params).startswith("a softmax-routed block without its routing's attributes")
    finally:
        setattr(layer.mlp, attr, k)


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_on_the_gpu_every_moe_layer_runs_its_kernels_bitwise_mlx_lm(family):
    """One sequence: each layer's launches are the fused kernels (no reference, no mlx-lm
    fallback) and the logits are stock's."""
    mx.set_default_device(mx.gpu)  # blocks_on_the_cpu puts the CPU back afterwards
    model = build(family, cuda_widths=True)
    stock = greedy_logits(model, _prompt(1), 4)
    result, patched, plans = patched_run(moe_block, model, _prompt(1), 4)
    assert result.patterns["moe_block"].path == "kernel", result.patterns["moe_block"].fallbacks
    assert _paths(plans, 1) == [f"kernel: {n}" for n in LAYERS[family](len(plans))]
    assert same(stock, patched)


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_on_the_gpu_the_family_preset_with_the_block_is_bitwise_stock(family):
    """test_family_cuda_presets' check of the family's CUDA preset with moe_block taking the
    MoE layers."""
    mx.set_default_device(mx.gpu)
    preset = FAMILIES[family].preset_on("cuda")
    _check_bitwise(build(family, cuda_widths=True), preset, stock_twice=True)


# gpt-oss's down half in moe_down (softmax_layer.OAI_DOWN, on): the experts' biases in the
# kernel; off, the layers end in moe_mlp and mlx-lm's down projection
OAI_DOWN = "residual_norm, softmax_router, moe_mlp, moe_down"
OAI_DOWN_OFF = "residual_norm, softmax_router, moe_mlp"


@pytest.mark.parametrize("spec", ["synth:gpt_oss/tiny/affine4", "synth:gpt_oss/tiny/mxfp4"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("oai_down", [True, False])
def test_with_oai_down_gpt_oss_layers_end_in_moe_down_bitwise_mlx_lm(monkeypatch, spec, batch, oai_down):
    monkeypatch.setattr(moe_block.softmax_layer, "OAI_DOWN", oai_down)
    model, _ = synth.build(spec)
    prompt = _prompt(batch)
    stock = greedy_logits(model, prompt, 3)
    _, patched, plans = patched_run(moe_block, model, prompt, 3)
    launches = OAI_DOWN if oai_down else OAI_DOWN_OFF
    assert _paths(plans, batch) == [f"reference: {launches}"] * len(plans)
    assert same(stock, patched)


@pytest.mark.cuda
@pytest.mark.parametrize("switch", ["OAI_DOWN", "ROUTER_BIAS"])
def test_on_the_gpu_with_oai_down_gpt_oss_runs_its_kernels_bitwise(monkeypatch, switch):
    """OAI_DOWN's and ROUTER_BIAS's check: one sequence's layers run the four kernels, the
    logits stock's, and the family's CUDA preset with the switch stays bitwise stock."""
    monkeypatch.setattr(moe_block.softmax_layer, "OAI_DOWN", True)
    monkeypatch.setattr(moe_block.softmax_layer, switch, True)
    mx.set_default_device(mx.gpu)
    model = build("gpt_oss", cuda_widths=True)
    stock = greedy_logits(model, _prompt(1), 4)
    result, patched, plans = patched_run(moe_block, model, _prompt(1), 4)
    assert result.patterns["moe_block"].path == "kernel", result.patterns["moe_block"].fallbacks
    assert _paths(plans, 1) == [f"kernel: {OAI_DOWN}"] * len(plans)
    assert same(stock, patched)
    _check_bitwise(model, FAMILIES["gpt_oss"].preset_on("cuda"), stock_twice=True)


MIXTRAL = "residual_norm, softmax_router, moe_mlp, moe_down"


@pytest.mark.parametrize("batch", [1, 2])
def test_mixtral_layers_run_the_block_bitwise_mlx_lm(batch):
    """Mixtral's MoE module is block_sparse_moe (the family data's mlp_name): top-2 of the
    gates, then the softmax of the two; its layers take the same four launches as Qwen3-MoE's."""
    model = build("mixtral")
    params = _params("mixtral")
    layer = model.model.layers[0]
    assert PATTERNS["moe_block"].check(layer, params) is None
    assert PATTERNS["moe_block"].check(layer, {"softmax_first": False}) == "decoder layer has no mlp"
    stock = greedy_logits(model, _prompt(batch), 3)
    result, patched, plans = patched_run(moe_block, model, _prompt(batch), 3)
    assert result.patterns["moe_block"].skipped == []
    assert _paths(plans, batch) == [f"reference: {MIXTRAL}"] * len(plans)
    assert same(stock, patched)


@pytest.mark.cuda
def test_on_the_gpu_mixtral_layers_run_their_kernels_bitwise_mlx_lm():
    mx.set_default_device(mx.gpu)
    model = build("mixtral", cuda_widths=True)
    stock = greedy_logits(model, _prompt(1), 4)
    result, patched, plans = patched_run(moe_block, model, _prompt(1), 4)
    assert result.patterns["moe_block"].path == "kernel", result.patterns["moe_block"].fallbacks
    assert _paths(plans, 1) == [f"kernel: {MIXTRAL}"] * len(plans)
    assert same(stock, patched)
    _check_bitwise(model, (*FAMILIES["mixtral"].preset_on("cuda"), "moe_block"), stock_twice=True)


# gpt-oss's quantized router's bias in softmax_router (softmax_layer.ROUTER_BIAS)


def _router_gates(model) -> list:
    """Each layer's prepared block's gate piece (BiasFree where softmax_router takes the bias)."""
    out = []
    for layer in model.model.layers:
        for _, block in moe_block._BLOCKS[id(layer)][1].values():
            out.append(getattr(block, "block", block).gate)
    return out


@pytest.mark.parametrize("spec", ["synth:gpt_oss/tiny/affine4", "synth:gpt_oss/tiny/mxfp4"])
@pytest.mark.parametrize("batch", [1, 2])
def test_with_router_bias_gpt_oss_routes_in_the_kernel_bitwise_mlx_lm(monkeypatch, spec, batch):
    monkeypatch.setattr(moe_block.softmax_layer, "ROUTER_BIAS", True)
    model, _ = synth.build(spec)
    prompt = _prompt(batch)
    stock = greedy_logits(model, prompt, 3)
    result, patched, plans = patched_run(moe_block, model, prompt, 3)
    assert _paths(plans, batch) == [f"reference: {OAI_DOWN}"] * len(plans)
    assert same(stock, patched)


def test_with_router_bias_the_prepared_gate_is_the_bias_free_matmul(monkeypatch):
    monkeypatch.setattr(moe_block.softmax_layer, "ROUTER_BIAS", True)
    model, _ = synth.build("synth:gpt_oss/tiny/affine4")
    zmlx.patch(model, patterns=["moe_block"])
    try:
        greedy_logits(model, _prompt(1), 2)
        gates = _router_gates(model)
        assert gates and all(isinstance(g, moe_block.softmax_layer.BiasFree) for g in gates)
    finally:
        zmlx.unpatch(model)
    monkeypatch.setattr(moe_block.softmax_layer, "ROUTER_BIAS", False)
    zmlx.patch(model, patterns=["moe_block"])
    try:
        greedy_logits(model, _prompt(1), 2)
        assert not any(isinstance(g, moe_block.softmax_layer.BiasFree) for g in _router_gates(model))
    finally:
        zmlx.unpatch(model)
