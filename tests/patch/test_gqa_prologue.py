"""gqa_prologue: a Qwen3-MoE decoder layer's attention half at decode as norm_qkv_a (input norm
+ q, k and v projections) and qk_norm_rope (q/k norms + RoPE), then mlx-lm's ops. On the CPU
the launches run their references, which must give mlx-lm's own layer bitwise (compared with
the unpatched model, never with a copy of the pattern); the `cuda` tests run the kernels."""

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import pytest
from block_helpers import patched_run, same
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import glm4_moe, qwen3_moe
from test_family_exactness import _check_bitwise, _random_like, build

import zmlx
from zmlx import synth
from zmlx.families import FAMILIES
from zmlx.fidelity import greedy_logits
from zmlx.patch import PATTERNS
from zmlx.patch.patterns import gqa_prologue

LAUNCHES = "norm_qkv_a, qk_norm_rope"


@pytest.fixture(autouse=True)
def fresh_blocks():
    """The CPU as the default device, and no block prepared before or after the test."""
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    gqa_prologue._BLOCKS.clear()
    yield
    gqa_prologue._BLOCKS.clear()
    mx.set_default_device(before)


def _prompt(batch: int) -> mx.array:
    return mx.random.randint(1, 512, (batch, 6), key=mx.random.key(batch))


def _paths(plans, batch: int) -> list[str]:
    key = next(k for k in plans[0] if k[0][0] == batch)
    return [p[key].split(" (")[0] for p in plans]


def _qwen3(layers=2, hidden=2048, heads=32, kv_heads=4, head_dim=128, dtype=mx.bfloat16, quant=(64, 4)):
    """A Qwen3-MoE model with Qwen3-30B-A3B's attention (hidden 2048, 32 query heads over 4 key
    heads of 128) and a small MoE, random weights in `dtype`, quantized `quant` (None: not)."""
    args = qwen3_moe.ModelArgs(
        model_type="qwen3_moe",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=256,
        num_attention_heads=heads,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=128,
        rms_norm_eps=1e-6,
        vocab_size=512,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        norm_topk_prob=True,
    )
    model = qwen3_moe.Model(args)
    params = tree_flatten(model.parameters())
    model.update(
        tree_unflatten(
            [(n, _random_like(n, p, mx.random.key(i)).astype(dtype)) for i, (n, p) in enumerate(params)]
        )
    )
    if quant is not None:
        nn.quantize(model, group_size=quant[0], bits=quant[1])
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("batch", [1, 2])
def test_every_layer_runs_the_launches_bitwise_mlx_lm(batch):
    model = build("qwen3_moe")
    stock = greedy_logits(model, _prompt(batch), 3)
    result, patched, plans = patched_run(gqa_prologue, model, _prompt(batch), 3)
    assert result.patterns["gqa_prologue"].skipped == []
    assert len(result.patterns["gqa_prologue"].patched) == len(model.model.layers)
    assert _paths(plans, batch) == [f"reference: {LAUNCHES}"] * len(plans)
    assert same(stock, patched)


def test_with_the_family_preset_every_case_is_bitwise():
    """test_family_exactness's comparison (prompts and decode, batch 1 and 2, with and without
    a cache) of Qwen3-MoE's CUDA preset, which holds gqa_prologue and moe_block."""
    preset = FAMILIES["qwen3_moe"].preset_on("cuda")
    assert {"gqa_prologue", "moe_block"} <= set(preset)
    _check_bitwise(build("qwen3_moe"), preset)


def test_the_comparison_sees_the_keys_off_by_a_rounding(monkeypatch):
    """The same comparison fails when qk_norm_rope's keys are off by one bf16 step: the patched
    decode really takes its keys from the launch."""
    model = build("qwen3_moe")
    stock = greedy_logits(model, _prompt(1), 2)
    ref = gqa_prologue.qk_norm_rope.reference

    def off(*a, **k):
        q, key = ref(*a, **k)
        return q, key * (1 + 2**-7)

    monkeypatch.setattr(
        gqa_prologue, "qk_norm_rope", dataclasses.replace(gqa_prologue.qk_norm_rope, reference=off)
    )
    _, patched, _ = patched_run(gqa_prologue, model, _prompt(1), 2)
    assert same(stock[:1], patched[:1])  # the prompt runs mlx-lm's layer
    assert not same(stock, patched)


def test_qwen3_30b_attention_shapes_run_bitwise():
    """Qwen3-30B-A3B's attention widths (32 heads over 4 of 128, hidden 2048), affine 4-bit."""
    model = _qwen3(layers=1)
    stock = greedy_logits(model, _prompt(1), 2)
    _, patched, plans = patched_run(gqa_prologue, model, _prompt(1), 2)
    assert _paths(plans, 1) == [f"reference: {LAUNCHES}"]
    assert same(stock, patched)


def test_new_projections_are_prepared_again():
    """The prepared block holds k_proj's and v_proj's rows as one matrix: quantizing them after
    a decode step prepares the layer again, and the output is the new weights' (stock's)."""
    model = build("qwen3_moe", quant="float32")
    layer = model.model.layers[1]
    zmlx.patch(model, patterns=["gqa_prologue"])
    try:
        greedy_logits(model, _prompt(1), 2)
        nn.quantize(
            layer.self_attn, group_size=64, bits=8, class_predicate=lambda p, m: p in ("k_proj", "v_proj")
        )
        patched = greedy_logits(model, _prompt(1), 2)
        entries = gqa_prologue._BLOCKS[id(layer)][1]  # before unpatch, which lets them go
        assert entries and all(w[0][8] is layer.self_attn.k_proj for w in entries.values())
    finally:
        zmlx.unpatch(model)
    assert same(greedy_logits(model, _prompt(1), 2), patched)


def test_the_check_says_why_not():
    check = PATTERNS["gqa_prologue"].check
    layer = build("qwen3_moe").model.layers[1]
    attn = layer.self_attn
    assert check(layer, {}) is None
    rope = attn.rope
    try:
        attn.rope = nn.RoPE(rope.dims, traditional=True, base=rope.base)
        assert (
            check(layer, {})
            == "rope is a RoPE (only nn.RoPE or YarnRoPE, traditional False, over at most the head)"
        )
        attn.rope = nn.RoPE(2 * rope.dims, base=rope.base)  # wider than the head
        assert check(layer, {}).startswith("rope is a RoPE")
        attn.rope = nn.RoPE(rope.dims // 2, base=rope.base)  # a partial rope: taken (GLM-4.5's)
        assert check(layer, {}) is None
    finally:
        attn.rope = rope
    v = attn.v_proj
    try:
        attn.v_proj = nn.QuantizedLinear.from_linear(nn.Linear(128, 128, bias=False), group_size=32, bits=8)
        assert (
            check(layer, {})
            == "k_proj and v_proj are quantized differently (their rows cannot share one matrix)"
        )
        attn.v_proj = nn.Linear(128, 128, bias=True)
        assert check(layer, {}) == "v_proj is an unquantized linear with a bias"
    finally:
        attn.v_proj = v
    mixtral = build("mixtral").model.layers[0]
    assert check(mixtral, {}) == "decoder layer has no mlp"  # its MoE module is block_sparse_moe
    assert check(mixtral, dict(FAMILIES["mixtral"].targets["gqa_prologue"].params)) is None


def test_a_prompt_and_a_masked_step_run_mlx_lm():
    model = build("qwen3_moe")
    zmlx.patch(model, patterns=["gqa_prologue"])
    try:
        mx.eval(model(_prompt(1)))
        assert [gqa_prologue.decode_plan(layer) for layer in model.model.layers] == [{}] * len(
            model.model.layers
        )
    finally:
        zmlx.unpatch(model)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,quant", [(mx.bfloat16, (64, 4)), (mx.bfloat16, (32, 8)), (mx.float16, None)])
def test_on_the_gpu_the_launches_are_the_kernels_and_bitwise_mlx_lm(dtype, quant):
    """One sequence at Qwen3-30B-A3B's attention widths: each layer's launches are the kernels
    (no reference, no mlx-lm fallback) and the logits are stock's, which must repeat first."""
    mx.set_default_device(mx.gpu)
    model = _qwen3(dtype=dtype, quant=quant)
    _gpu_layers_are_the_kernels(model)


@pytest.mark.cuda
def test_on_the_gpu_the_family_preset_is_bitwise_stock():
    """test_family_cuda_presets' check of Qwen3-MoE's CUDA preset, gqa_prologue in it."""
    mx.set_default_device(mx.gpu)
    _check_bitwise(
        build("qwen3_moe", cuda_widths=True), FAMILIES["qwen3_moe"].preset_on("cuda"), stock_twice=True
    )


def test_glm45_layers_run_the_launches_bitwise_mlx_lm():
    """GLM-4.5's attention (glm4_moe, tiny): biased q/k/v projections, q/k norms, half of each
    head rotated; and without the norms (GLM-4.5-Air's use_qk_norm False)."""
    model = build("glm4_moe")
    for norms in (True, False):
        saved = [(a, a.q_norm, a.k_norm) for a in (layer.self_attn for layer in model.model.layers)]
        if not norms:
            for attn, _, _ in saved:
                del attn["q_norm"], attn["k_norm"]
                attn.use_qk_norm = False
        try:
            stock = greedy_logits(model, _prompt(1), 3)
            result, patched, plans = patched_run(gqa_prologue, model, _prompt(1), 3)
            assert result.patterns["gqa_prologue"].skipped == []
            assert _paths(plans, 1) == [f"reference: {LAUNCHES}"] * len(plans)
            assert same(stock, patched), norms
        finally:
            for attn, qn, kn in saved:
                attn.q_norm, attn.k_norm, attn.use_qk_norm = qn, kn, True


def test_the_check_refuses_what_stock_runs_otherwise():
    check = PATTERNS["gqa_prologue"].check
    unquantized = build("glm4_moe", quant="float32").model.layers[1]
    assert check(unquantized, {}) == "q_proj is an unquantized linear with a bias"
    layer = build("glm4_moe").model.layers[1]
    attn = layer.self_attn
    bias = attn.v_proj["bias"]
    try:
        del attn.v_proj["bias"]
        assert check(layer, {}) == "some of q_proj, k_proj and v_proj have a bias, not all"
    finally:
        attn.v_proj["bias"] = bias
    qn = attn.q_norm
    try:
        del attn["q_norm"]
        assert check(layer, {}).startswith("q_norm and k_norm are [None, 'RMSNorm']")
    finally:
        attn.q_norm = qn
    assert check(build("gpt_oss", quant="float32").model.layers[0], {}) == (
        "q_proj is an unquantized linear with a bias"
    )


def _glm45_air(layers=1, dtype=mx.bfloat16, quant=(64, 4)):
    """A glm4_moe model with GLM-4.5-Air's attention (hidden 4096, 96 query heads over 8 key
    heads of 128, biased projections, no q/k norms, half of each head rotated), a small MoE."""
    args = glm4_moe.ModelArgs(
        model_type="glm4_moe",
        vocab_size=512,
        hidden_size=4096,
        intermediate_size=256,
        max_position_embeddings=4096,
        moe_intermediate_size=128,
        norm_topk_prob=True,
        num_attention_heads=96,
        n_group=1,
        head_dim=128,
        topk_group=1,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=1.0,
        num_experts_per_tok=2,
        first_k_dense_replace=0,
        num_hidden_layers=layers,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=1_000_000.0,
        rope_scaling=None,
        use_qk_norm=False,
        tie_word_embeddings=False,
        attention_bias=True,
        partial_rotary_factor=0.5,
    )
    model = glm4_moe.Model(args)
    params = tree_flatten(model.parameters())
    new = [(n, _random_like(n, p, mx.random.key(i))) for i, (n, p) in enumerate(params)]
    model.update(tree_unflatten([(n, v.astype(mx.float32 if "correction" in n else dtype)) for n, v in new]))
    nn.quantize(model, group_size=quant[0], bits=quant[1])
    mx.eval(model.parameters())
    return model


def _gpu_layers_are_the_kernels(model) -> None:
    """On the GPU, one sequence: stock repeats itself, every layer's launches are the kernels
    and the logits are stock's."""
    stock = greedy_logits(model, _prompt(1), 4)
    assert same(stock, greedy_logits(model, _prompt(1), 4)), "stock is not deterministic here"
    result, patched, plans = patched_run(gqa_prologue, model, _prompt(1), 4)
    assert result.patterns["gqa_prologue"].path == "kernel", result.patterns["gqa_prologue"].fallbacks
    assert _paths(plans, 1) == [f"kernel: {LAUNCHES}"] * len(plans)
    assert same(stock, patched)


@pytest.mark.cuda
def test_on_the_gpu_glm45_air_attention_is_the_kernels_and_bitwise_mlx_lm():
    """GLM-4.5-Air's attention widths on the GPU: the launches are the kernels, stock's logits."""
    mx.set_default_device(mx.gpu)
    model = _glm45_air()
    _gpu_layers_are_the_kernels(model)


def test_gpt_oss_layers_run_the_launches_bitwise_mlx_lm():
    """gpt-oss (tiny): biased projections, no norms, attention sinks passed to mlx-lm's SDPA,
    and the sliding-window layers' RotatingKVCache past its window (6 + 3 tokens, window 4)."""
    model = build("gpt_oss")
    stock = greedy_logits(model, _prompt(1), 3)
    result, patched, plans = patched_run(gqa_prologue, model, _prompt(1), 3)
    assert result.patterns["gqa_prologue"].skipped == []
    assert _paths(plans, 1) == [f"reference: {LAUNCHES}"] * len(plans)
    assert same(stock, patched)


def test_gpt_oss_yarn_rope_runs_bitwise_and_mxfp4_projections_say_why():
    """The synthetic gpt-oss has gpt-oss-20b's YaRN rope; its mxfp4 preset quantizes the
    attention's projections mxfp4 too, which norm_qkv_a does not read."""
    model, _ = synth.build("synth:gpt_oss/tiny/affine4")
    assert type(model.model.layers[0].self_attn.rope).__name__ == "YarnRoPE"
    prompt = mx.random.randint(1, 512, (1, 20), key=mx.random.key(3))  # past the window of 16
    stock = greedy_logits(model, prompt, 3)
    _, patched, plans = patched_run(gqa_prologue, model, prompt, 3)
    assert _paths(plans, 1) == [f"reference: {LAUNCHES}"] * len(plans)
    assert same(stock, patched)
    mxfp4, _ = synth.build("synth:gpt_oss/tiny/mxfp4")
    assert (
        PATTERNS["gqa_prologue"].check(mxfp4.model.layers[0], {}) == "q_proj is mxfp4-quantized (affine only)"
    )


@pytest.mark.cuda
def test_on_the_gpu_gpt_oss_layers_are_the_kernels_and_bitwise_mlx_lm():
    mx.set_default_device(mx.gpu)
    model = build("gpt_oss", cuda_widths=True)
    _gpu_layers_are_the_kernels(model)


@pytest.mark.parametrize("batch", [1, 2])
def test_mixtral_layers_run_the_launches_bitwise_mlx_lm(batch):
    """Mixtral: no q/k norms or biases, its heads named num_heads, its MoE module
    block_sparse_moe (the family data's mlp_name, which the layer's shared __call__ takes)."""
    model = build("mixtral")
    stock = greedy_logits(model, _prompt(batch), 3)
    result, patched, plans = patched_run(gqa_prologue, model, _prompt(batch), 3)
    assert result.patterns["gqa_prologue"].skipped == []
    assert _paths(plans, batch) == [f"reference: {LAUNCHES}"] * len(plans)
    assert same(stock, patched)
    _check_bitwise(model, ("gqa_prologue", "moe_block"))


@pytest.mark.cuda
def test_on_the_gpu_mixtral_layers_are_the_kernels_and_bitwise_mlx_lm():
    mx.set_default_device(mx.gpu)
    model = build("mixtral", cuda_widths=True)
    _gpu_layers_are_the_kernels(model)
    preset = (*FAMILIES["mixtral"].preset_on("cuda"), "moe_block", "gqa_prologue")
    _check_bitwise(model, preset, stock_twice=True)
