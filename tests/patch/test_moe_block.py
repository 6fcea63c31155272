"""moe_block: the decoder layer's MoE half at decode through prepared launches; on the CPU
their references, which must be mlx-lm's own layer bitwise (compared with the unpatched
model, never with a copy of the pattern)."""

import copy
import dataclasses
import pickle

import mlx.core as mx
import mlx.nn as nn
import pytest
from block_helpers import (
    check_a_copy_runs_patched,
    check_a_launch_that_skips_runs_mlx_lm_once_per_layer,
    check_a_layer_that_is_gone_takes_its_prepared_blocks_with_it,
    check_a_prompt_runs_mlx_lms_layer,
    check_moe_block_is_bitwise_mlx_lm_on_the_cpu,
    check_presets,
    patched_run,
    same,
    snapshot,
)
from mlx_lm.models import glm4_moe_lite

import zmlx
from zmlx import synth
from zmlx.config import PatchConfig
from zmlx.fidelity import greedy_logits
from zmlx.patch.patterns import moe_block

PROMPT = mx.array([[3, 14, 15, 92, 65]])
# the CUDA preset: the module patterns moe_block contains at decode
MODULE_PATTERNS = ["moe_router", "moe_mlp", "downproj_combine", "swiglu_mlp", "glm47_rope"]


pytestmark = pytest.mark.usefixtures("blocks_on_the_cpu")


@pytest.mark.parametrize("which", ["tiny_q4", "tiny_f32"])
@pytest.mark.parametrize("batch", [1, 2])
def test_moe_block_is_bitwise_mlx_lm(request, which, batch):
    check_moe_block_is_bitwise_mlx_lm_on_the_cpu(request.getfixturevalue(which)[0], batch)


def test_without_a_shared_expert_moe_mlp_is_the_second_launch(fresh_q4):
    model = fresh_q4
    model.args.n_shared_experts = None  # every MoE's config: stock drops its shared expert too
    stock = greedy_logits(model, PROMPT, 3)
    _, patched, plans = patched_run(moe_block, model, PROMPT, 3)
    assert same(stock, patched)
    assert all("norm_router, moe_mlp, moe_down" in next(iter(p.values())) for p in plans[1:])


def test_the_comparison_sees_one_launch_off_by_a_rounding(tiny_q4, monkeypatch):
    """The same comparison fails when moe_down's output is off by one bf16 step: the patched
    decode really runs the block."""
    model, _ = tiny_q4
    stock = greedy_logits(model, PROMPT, 2)
    ref = moe_block.moe_down.reference
    off = dataclasses.replace(moe_block.moe_down, reference=lambda *a, **k: ref(*a, **k) * (1 + 2**-7))
    monkeypatch.setattr(moe_block, "moe_down", off)
    _, patched, _ = patched_run(moe_block, model, PROMPT, 2)
    assert same(stock[:1], patched[:1])  # the prompt: mlx-lm's own layer
    assert not same(stock, patched)


def test_a_prompt_runs_mlx_lms_layer(tiny_q4):
    check_a_prompt_runs_mlx_lms_layer(moe_block, tiny_q4[0], PROMPT)


def test_rows_mlx_lm_sorts_run_mlx_lms_code(tiny_q4):
    """16 sequences x top-4 = 64 expert rows: mlx-lm sorts them by expert; moe_block leaves
    such MoE steps to mlx-lm (the dense layer still runs its block)."""
    model, _ = tiny_q4
    prompt = mx.array([[3, 14, 15, 92, 65]] * 16) + mx.arange(16)[:, None]
    stock = greedy_logits(model, prompt, 2)
    _, patched, plans = patched_run(moe_block, model, prompt, 2)
    assert same(stock, patched)
    assert next(iter(plans[0].values())).startswith("reference: residual_norm")
    assert all(
        list(p.values()) == ["mlx-lm (64 expert rows: mlx-lm sorts them by expert (its own path))"]
        for p in plans[1:]
    )


def test_a_launch_that_skips_runs_mlx_lms_code_and_is_decided_once(tiny_q4, monkeypatch):
    check_a_launch_that_skips_runs_mlx_lm_once_per_layer(
        monkeypatch, moe_block, "moe_down", tiny_q4[0], PROMPT
    )


def test_each_layer_prepares_once_per_shape_and_again_for_new_weights(fresh_q4, monkeypatch):
    model = fresh_q4
    prepared = []
    real = moe_block.prepare
    monkeypatch.setattr(moe_block, "prepare", lambda k, *a: prepared.append(k.name) or real(k, *a))
    layers = model.args.num_hidden_layers
    zmlx.patch(model, patterns=["moe_block"])
    try:
        greedy_logits(model, PROMPT, 4)
        assert len(prepared) == 3 * layers  # once, for 4 decode steps
        greedy_logits(model, mx.concatenate([PROMPT, PROMPT]), 2)  # batch 2: another shape
        assert len(prepared) == 6 * layers
        # new weights (the same values, new arrays: as model.update or load_weights leave them)
        down = model.model.layers[2].mlp.switch_mlp.down_proj
        down.scales = mx.array(down.scales * 2)
        patched = greedy_logits(model, PROMPT, 2)
        assert len(prepared) == 6 * layers + 3  # only that layer, again
    finally:
        zmlx.unpatch(model)
    assert same(patched, greedy_logits(model, PROMPT, 2))  # stock, with the new weights


def test_patch_and_unpatch_leave_the_model_as_it_was(tiny_q4):
    model, _ = tiny_q4
    before = snapshot(model)
    zmlx.patch(model, patterns=["moe_block"])
    layer_cls = type(model.model.layers[1])
    assert layer_cls is not glm4_moe_lite.Glm4MoeLiteDecoderLayer
    assert isinstance(model.model.layers[1], glm4_moe_lite.Glm4MoeLiteDecoderLayer)
    greedy_logits(model, PROMPT, 2)  # prepared blocks live outside the modules
    zmlx.unpatch(model)
    assert snapshot(model) == before
    assert all(type(layer) is glm4_moe_lite.Glm4MoeLiteDecoderLayer for layer in model.model.layers)
    assert dict(vars(glm4_moe_lite.Glm4MoeLiteDecoderLayer)).get("__call__") is not None


def test_excluding_moe_block_leaves_todays_patterns(tiny_q4):
    model, _ = tiny_q4
    flag = PatchConfig.from_env({"ZMLX_MOE_BLOCK": "1"})
    result = zmlx.patch(model, patterns=MODULE_PATTERNS + ["moe_block"], exclude=["moe_block"])
    try:
        assert result.not_selected["moe_block"] == "excluded"
        assert "moe_block" not in result.patterns
        assert all(type(layer) is glm4_moe_lite.Glm4MoeLiteDecoderLayer for layer in model.model.layers)
        assert {n for n, r in result.patterns.items() if r.patched} == set(MODULE_PATTERNS)
    finally:
        zmlx.unpatch(model)
    assert "moe_block" in zmlx.patch(model, config=flag).patterns  # its flag adds it to the preset
    assert zmlx.patch(model, exclude="moe_block", config=flag).not_selected["moe_block"] == "excluded"
    zmlx.unpatch(model)


def test_with_the_module_patterns_moe_block_runs_decode_and_they_run_prompts(tiny_q4):
    model, _ = tiny_q4
    stock = greedy_logits(model, PROMPT, 3)
    result, patched, plans = patched_run(moe_block, model, PROMPT, 3, MODULE_PATTERNS + ["moe_block"])
    assert same(stock, patched)
    assert all(result.patterns[n].patched for n in MODULE_PATTERNS + ["moe_block"])
    assert all(next(iter(p.values())).startswith("reference: ") for p in plans)


def test_residual_norm_yields_to_moe_block_and_says_why(tiny_q4):
    model, _ = tiny_q4
    stock = greedy_logits(model, PROMPT, 3)
    result, patched, plans = patched_run(moe_block, model, PROMPT, 3, ["moe_block", "residual_norm"])
    assert same(stock, patched)
    assert len(result.patterns["moe_block"].patched) == model.args.num_hidden_layers
    assert result.patterns["residual_norm"].patched == []
    assert result.patterns["residual_norm"].skipped == [
        ("*", "moe_block is applied and this pattern would bypass it")
    ]
    assert all(plans)  # the layers' blocks ran: no model loop went around them
    assert "moe_block is applied" in str(result)


def test_residual_norm_applies_where_moe_block_patches_nothing():
    model, _ = synth.build("synth:glm4_moe_lite/tiny/bf16")
    nn.quantize(model, mode="mxfp8")  # a quantization the block's kernels do not read
    result = zmlx.patch(model, patterns=["moe_block", "residual_norm"])
    try:
        block = result.patterns["moe_block"]
        assert block.patched == [] and len(block.skipped) == model.args.num_hidden_layers
        assert all("mxfp8-quantized (affine or mxfp4 only)" in why for _, why in block.skipped), block.skipped
        assert result.patterns["residual_norm"].patched == ["model"]
    finally:
        zmlx.unpatch(model)


def _grouped(m):  # groups the router kernels cannot take (2..32 groups of >= 2 experts are)
    m.model.layers[1].mlp.gate.n_group = 3


def _other_activation(m):
    m.model.layers[1].mlp.switch_mlp.activation = object()


def _mixed_packing(m):
    import mlx.nn as nn

    mlp = m.model.layers[0].mlp
    mlp.up_proj = nn.QuantizedLinear.from_linear(nn.Linear(128, 256, bias=False), group_size=32, bits=8)


@pytest.mark.parametrize(
    "change, layer, why",
    [
        (_grouped, 1, "64 experts in 3 groups (the kernel takes <= 32 groups of >= 2 experts)"),
        (_other_activation, 1, "activation object (only SwiGLU is fused)"),
        (_mixed_packing, 0, "mlp: gate_proj and up_proj are quantized differently"),
    ],
)
def test_check_says_why_a_layer_does_not_fit(fresh_q4, change, layer, why):
    change(fresh_q4)
    result = zmlx.patch(fresh_q4, patterns=["moe_block"])
    zmlx.unpatch(fresh_q4)
    report = result.patterns["moe_block"]
    assert (f"model.layers.{layer}", why) in [(p, w[: len(why)]) for p, w in report.skipped]
    assert len(report.patched) == fresh_q4.args.num_hidden_layers - 1


def test_the_report_names_moe_block(tiny_q4):
    model, _ = tiny_q4
    result = zmlx.patch(model, patterns=["moe_block"])
    zmlx.unpatch(model)
    report = result.patterns["moe_block"]
    assert report.patched == [f"model.layers.{i}" for i in range(model.args.num_hidden_layers)]
    assert (report.fidelity, report.path) == ("exact", "reference")  # exact on the CPU: stock's ops
    assert zmlx.PATTERNS["moe_block"].fidelity == "close" and zmlx.PATTERNS["moe_block"].paths == ("decode",)
    assert f"moe_block (exact): patched {model.args.num_hidden_layers}" in str(result)


def test_moe_block_is_in_the_cuda_presets_only():
    check_presets(moe_block, with_it=("cuda",))


@pytest.mark.parametrize(
    "copier", [lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy], ids=["pickle", "deepcopy"]
)
def test_a_model_patched_with_moe_block_copies_patched(tiny_q4, copier):
    model, _ = tiny_q4
    stock = greedy_logits(model, PROMPT, 2)
    zmlx.patch(model, patterns=["moe_block"])
    try:
        check_a_copy_runs_patched(moe_block, model, copier(model), PROMPT, stock)
    finally:
        zmlx.unpatch(model)


def test_a_layer_that_is_gone_takes_its_prepared_blocks_with_it():
    check_a_layer_that_is_gone_takes_its_prepared_blocks_with_it(moe_block, PROMPT)


def test_a_pattern_that_yields_is_registered_after_the_one_it_yields_to():
    """patch() plans in registry order: residual_norm can see that moe_block patched layers
    only when moe_block was planned first."""
    order = list(zmlx.PATTERNS)
    assert zmlx.PATTERNS["residual_norm"].yields_to == (
        "moe_block",
        "mla_block",
        "mla_prologue",
        "gqa_prologue",
    )
    for name, p in zmlx.PATTERNS.items():
        assert all(order.index(w) < order.index(name) for w in p.yields_to), name


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["tiny_q4", "tiny_f32", "no_shared_q4"])
def test_on_the_gpu_every_layer_runs_its_kernels_bitwise_mlx_lm(request, which):
    """One sequence (the kernels' regime on CUDA): each layer's three launches are the fused
    kernels (no reference, no mlx-lm fallback) and the tokens and logits are stock's. With a
    shared expert the MoE layers route in moe_gate_up_route (from norm_router_gates' gates),
    without one in norm_router."""
    mx.set_default_device(mx.gpu)  # blocks_on_the_cpu puts the CPU back afterwards
    if which == "no_shared_q4":
        model = request.getfixturevalue("fresh_q4")
        model.args.n_shared_experts = None  # every MoE's config: stock drops its shared expert too
    else:
        model, _ = request.getfixturevalue(which)
    stock = greedy_logits(model, PROMPT, 4)
    result, patched, plans = patched_run(moe_block, model, PROMPT, 4)
    assert result.patterns["moe_block"].path == "kernel", result.patterns["moe_block"].fallbacks
    moe = "norm_router, moe_mlp" if which == "no_shared_q4" else "norm_router_gates, moe_gate_up_route"
    names = ["residual_norm, swiglu_mlp"] + [moe] * (len(plans) - 1)
    assert [list(p.values()) for p in plans] == [[f"kernel: {n}, moe_down"] for n in names], plans
    assert same(stock, patched)
