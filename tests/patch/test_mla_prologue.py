"""mla_prologue: the decoder layer's attention half at decode through norm_qkv_a and
mla_q_prep_nope, then mlx-lm's own ops (cache update, rope scores, mask, embed_q, attention,
unembed_out, o_proj). On the CPU the two launches run their references, stock's op sequence,
so the patched model is bitwise stock: alone, with moe_block, over a static cache eagerly and
inside compiled_decode's traced step, on glm4_moe_lite and the DeepSeek-V3 family with and
without YaRN. Where a step runs mlx-lm's attention it is bitwise too; the tests that say the
launches ran look at `decode_plan` or forbid mlx-lm's attention."""

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
    check_presets,
    same,
    snapshot,
)
from mlx_lm.models import glm4_moe_lite
from mlx_lm.models.cache import KVCache, RotatingKVCache
from test_family_exactness import YARN, build

import zmlx
from zmlx import synth
from zmlx.config import PatchConfig
from zmlx.fidelity import greedy_logits
from zmlx.kernels import quant
from zmlx.patch import layer as shared_layer
from zmlx.patch.patterns import compiled_decode, mla_block, mla_prologue, moe_block
from zmlx.static_cache import StaticMLACache

PROMPT = mx.array([[3, 14, 15, 92, 65, 35, 89]])
LAUNCHES = "norm_qkv_a, mla_q_prep_nope"
ON_THE_CPU = f"reference: {LAUNCHES} (custom kernels do not run on MLX's CPU backend)"


@pytest.fixture(autouse=True)
def prologues_on_the_cpu(blocks_on_the_cpu, monkeypatch):
    """blocks_on_the_cpu, quant.QMM_ORDER off (so the second launch is mla_q_prep_nope; with it
    on: test_mla_prologue_embed.py), and no mla_prologue block prepared before or after."""
    monkeypatch.setattr(quant, "QMM_ORDER", False)
    mla_prologue._BLOCKS.clear()
    yield
    mla_prologue._BLOCKS.clear()


def _layers(model):
    return model.language_model.model.layers if hasattr(model, "language_model") else model.model.layers


def _plans(model):
    return [mla_prologue.decode_plan(layer) for layer in _layers(model)]


def _run(model, prompt, steps, patterns):
    """(PatchResult, greedy logits, each layer's decode plan) under `patterns`."""
    result = zmlx.patch(model, patterns=patterns)
    try:
        return result, greedy_logits(model, prompt, steps), _plans(model)
    finally:
        zmlx.unpatch(model)


@pytest.mark.parametrize("which", ["tiny_q4", "tiny_f32"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(
    "patterns", [["mla_prologue"], ["mla_prologue", "moe_block"]], ids=["alone", "with_moe"]
)
def test_decodes_bitwise_stock_through_its_launches(request, no_stock_attention, which, batch, patterns):
    model, _ = request.getfixturevalue(which)
    prompt = mx.random.randint(1, model.args.vocab_size, (batch, 7), key=mx.random.key(batch))
    stock = greedy_logits(model, prompt, 5)
    result, patched, plans = _run(model, prompt, 5, patterns)
    layers = [f"model.layers.{i}" for i in range(model.args.num_hidden_layers)]
    assert all(result.patterns[n].patched == layers for n in patterns)
    assert same(stock, patched)
    assert [list(p.values()) for p in plans] == [[ON_THE_CPU]] * model.args.num_hidden_layers


@pytest.mark.parametrize(
    "kernel,output",
    [("norm_qkv_a", 0), ("norm_qkv_a", 1)] + [("mla_q_prep_nope", i) for i in range(4)],
)
def test_every_launch_output_is_on_the_decode_path(tiny_q4, monkeypatch, kernel, output):
    """The decode steps read each output of both launches (q_a, ckv; q_nope into embed_q,
    q_pe * scale into the rope scores, kv_latent and k_pe into the cache): one off by 1% moves
    the logits (the prompt, mlx-lm's layer, does not move)."""
    model, _ = tiny_q4
    _, honest, _ = _run(model, PROMPT, 2, ["mla_prologue"])
    k = getattr(mla_prologue, kernel)

    def off(*a, **kw):
        out = list(k.reference(*a, **kw))
        out[output] = out[output] * 1.01
        return tuple(out)

    monkeypatch.setattr(mla_prologue, kernel, dataclasses.replace(k, reference=off))
    mla_prologue._BLOCKS.clear()  # prepared again, with the changed kernel
    _, patched, _ = _run(model, PROMPT, 2, ["mla_prologue"])
    assert same(honest[:1], patched[:1])
    assert not mx.array_equal(honest[1], patched[1]).item()


# ---------------------------------------------------------------- the DeepSeek-V3 family, YaRN


@pytest.mark.parametrize("family", sorted(YARN))
@pytest.mark.parametrize("yarn", [False, True])
@pytest.mark.parametrize("quant", ["affine4", "float32"])
def test_deepseek_family_decodes_bitwise_stock(no_stock_attention, family, yarn, quant):
    """DeepSeek-V3's and Kimi's classes (YaRN: the table's frequencies, the input's mscale, the
    scale's factor), alone and with moe_block, batch 2: every layer's launches ran."""
    model = build(family, quant, yarn)
    prompt = mx.random.randint(1, 512, (2, 7), key=mx.random.key(2))
    stock = greedy_logits(model, prompt, 3)
    n = len(_layers(model))
    for patterns in (["mla_prologue"], ["mla_prologue", "moe_block"]):
        mla_prologue._BLOCKS.clear()
        result, patched, plans = _run(model, prompt, 3, patterns)
        assert len(result.patterns["mla_prologue"].patched) == n, result.patterns["mla_prologue"].skipped
        assert result.patterns["mla_prologue"].fidelity == "exact"
        assert same(stock, patched), patterns
        assert [list(p.values()) for p in plans] == [[ON_THE_CPU]] * n


# ---------------------------------------------------------------- static cache, compiled_decode


@pytest.mark.parametrize("which", ["tiny_q4", "tiny_f32"])
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_steps_run_the_launches_bitwise_stock(request, no_stock_attention, which, batch):
    """Inside compiled_decode's traced step (the rope row gathered at the device position,
    the cache's mask applied to the rope scores as mlx-lm does), with moe_block too."""
    model, _ = request.getfixturevalue(which)
    prompt = mx.random.randint(1, model.args.vocab_size, (batch, 7), key=mx.random.key(batch))
    stock = greedy_logits(model, prompt, 8)
    for patterns in ("mla_prologue,compiled_decode", "mla_prologue,moe_block,compiled_decode"):
        zmlx.patch(model, patterns=patterns)
        try:
            ours, stats, plans = greedy_logits(model, prompt, 8), compiled_decode.stats(model), _plans(model)
        finally:
            zmlx.unpatch(model)
        assert stats["compiled_steps"] == 8 and stats["traces"] == 1 and stats["stock_steps"] == {}
        assert same(stock, ours), patterns
        assert all(list(p.values()) == [ON_THE_CPU] for p in plans)


@pytest.mark.parametrize("family", sorted(YARN))
def test_compiled_steps_of_a_yarn_family_are_bitwise_stock(no_stock_attention, family):
    model = build(family, "float32", True)
    stock = greedy_logits(model, PROMPT, 4)
    zmlx.patch(model, patterns="mla_prologue,compiled_decode")
    try:
        ours, stats = greedy_logits(model, PROMPT, 4), compiled_decode.stats(model)
    finally:
        zmlx.unpatch(model)
    assert stats["compiled_steps"] == 4 and same(stock, ours)


def test_eager_steps_over_a_static_cache_equal_kvcache(tiny_q4, no_stock_attention):
    model, _ = tiny_q4
    zmlx.patch(model, patterns="mla_prologue")
    try:
        outs = {}
        for kind in (KVCache, StaticMLACache):
            cache = [kind() for _ in model.layers]
            logits = [model(PROMPT, cache=cache)]
            for _ in range(4):
                logits.append(model(mx.argmax(logits[-1][:, -1:], axis=-1), cache=cache))
            mx.eval(logits)
            outs[kind] = logits
    finally:
        zmlx.unpatch(model)
    assert same(outs[KVCache], outs[StaticMLACache])


# ---------------------------------------------------------------- composition, the registry


def test_both_halves_make_one_function_whatever_the_order(tiny_q4):
    model, _ = tiny_q4
    want = shared_layer.make(attention=mla_prologue.attention_half, moe=moe_block.moe_half, renorm_eps=1e-20)
    for order in (["moe_block", "mla_prologue"], ["mla_prologue", "moe_block"]):
        zmlx.patch(model, patterns=order)
        try:
            assert all(type(layer).__call__ is want for layer in model.model.layers)
        finally:
            zmlx.unpatch(model)


@pytest.mark.parametrize("winner", ["mla_block", "mla_attention"])
def test_it_yields_to_mla_block_and_mla_attention(tiny_q4, winner):
    """mla_block runs the whole attention half (this one and more); mla_attention's kernels
    would be bypassed at decode. Either chosen: mla_prologue is skipped and says why."""
    model, _ = tiny_q4
    result = zmlx.patch(model, patterns=["mla_prologue", winner, "moe_block"])
    try:
        attention = mla_block.attention_half if winner == "mla_block" else None
        want = shared_layer.make(attention=attention, moe=moe_block.moe_half, renorm_eps=1e-20)
        assert all(type(layer).__call__ is want for layer in model.model.layers)
    finally:
        zmlx.unpatch(model)
    assert result.patterns["mla_prologue"].patched == []
    assert result.patterns["mla_prologue"].skipped == [
        ("*", f"{winner} is applied and this pattern would bypass it")
    ]


def test_residual_norm_yields_to_it(tiny_q4):
    model, _ = tiny_q4
    result, _, plans = _run(model, PROMPT, 2, ["mla_prologue", "residual_norm"])
    assert result.patterns["residual_norm"].skipped == [
        ("*", "mla_prologue is applied and this pattern would bypass it")
    ]
    assert all(plans)  # the layers' blocks ran: no model loop went around them


def test_patch_and_unpatch_leave_the_model_as_it_was(tiny_q4):
    model, _ = tiny_q4
    before = snapshot(model)
    zmlx.patch(model, patterns=["mla_prologue", "moe_block", "glm47_rope"])
    assert type(model.model.layers[1]) is not glm4_moe_lite.Glm4MoeLiteDecoderLayer
    greedy_logits(model, PROMPT, 2)  # prepared blocks live outside the modules
    zmlx.unpatch(model)
    assert snapshot(model) == before
    assert all(type(layer) is glm4_moe_lite.Glm4MoeLiteDecoderLayer for layer in model.model.layers)


@pytest.mark.parametrize(
    "copier", [lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy], ids=["pickle", "deepcopy"]
)
def test_a_patched_model_copies_patched(tiny_q4, copier):
    model, _ = tiny_q4
    stock = greedy_logits(model, PROMPT, 2)
    zmlx.patch(model, patterns=["mla_prologue", "moe_block"])
    try:
        check_a_copy_runs_patched(mla_prologue, model, copier(model), PROMPT, stock)
    finally:
        zmlx.unpatch(model)


def test_the_report_its_flag_and_the_cuda_preset(tiny_q4):
    model, _ = tiny_q4
    n = model.args.num_hidden_layers
    result = zmlx.patch(model, config=PatchConfig.from_env({"ZMLX_MLA_PROLOGUE": "1"}))
    zmlx.unpatch(model)
    report = result.patterns["mla_prologue"]
    assert (report.fidelity, report.path, len(report.patched), report.skipped) == (
        "exact",
        "reference",
        n,
        [],
    )
    assert "moe_router" in result.patterns  # the flag adds it to the preset
    result = zmlx.patch(
        model, exclude="mla_prologue", config=PatchConfig.from_env({"ZMLX_MLA_PROLOGUE": "1"})
    )
    zmlx.unpatch(model)
    assert result.not_selected["mla_prologue"] == "excluded"
    p = zmlx.PATTERNS["mla_prologue"]
    assert p.fidelity == "close" and p.paths == ("decode",)  # close on Metal (float32 dots)
    assert [k.name for k in p.kernels] == [*LAUNCHES.split(", "), "mla_q_prep_embed"]
    assert all(k.exact_on == ("cuda",) for k in p.kernels)
    check_presets(mla_prologue, with_it=("cuda",))  # bitwise stock there (5d3e65c193)


# ---------------------------------------------------------------- outside the regime: mlx-lm's code


def test_a_prompt_runs_mlx_lms_layer(tiny_q4):
    check_a_prompt_runs_mlx_lms_layer(mla_prologue, tiny_q4[0], PROMPT)


def test_other_caches_and_masks_run_mlx_lms_attention(tiny_q4):
    model, _ = tiny_q4

    def rotating(steps=3):
        cache = [RotatingKVCache(max_size=64) for _ in model.model.layers]
        outs = [model(PROMPT, cache=cache)]
        for _ in range(steps):
            outs.append(model(mx.argmax(outs[-1][:, -1:], axis=-1), cache=cache))
        mx.eval(outs)
        return outs

    stock = rotating()
    layer = model.model.layers[1]
    x = mx.random.normal((1, 1, model.args.hidden_size), key=mx.random.key(5)).astype(mx.bfloat16)
    stock_masked = layer(x, mx.array([[True]]), None)
    zmlx.patch(model, patterns=["mla_prologue"])
    try:
        assert same(rotating(), stock)
        assert mx.array_equal(layer(x, mx.array([[True]]), None), stock_masked).item()
        assert _plans(model) == [{}] * model.args.num_hidden_layers  # nothing prepared
    finally:
        zmlx.unpatch(model)


def test_a_launch_that_skips_runs_mlx_lms_attention_and_is_decided_once(tiny_q4, monkeypatch):
    model, _ = tiny_q4
    check_a_launch_that_skips_runs_mlx_lm_once_per_layer(
        monkeypatch, mla_prologue, "mla_q_prep_nope", model, PROMPT
    )


def _bias(m):
    attn = m.model.layers[1].self_attn
    attn.kv_a_proj_with_mqa.bias = mx.zeros((attn.kv_a_proj_with_mqa.weight.shape[0],))


def _eps(m):
    m.model.layers[1].self_attn.kv_a_layernorm.eps = 1e-3


def _no_q_lora(m):
    attn = m.model.layers[1].self_attn
    attn.q_lora_rank = None
    attn.q_proj = nn.Linear(8, 8, bias=False)


def _layer_norm(m):
    m.model.layers[1].input_layernorm = nn.LayerNorm(m.args.hidden_size)


def _rope(m):
    m.model.layers[1].self_attn.rope = nn.RoPE(64, traditional=False)


@pytest.mark.parametrize(
    "change, why",
    [
        (_bias, "kv_a_proj_with_mqa has a bias"),
        (_eps, "q_a_layernorm and kv_a_layernorm have different eps"),
        (_no_q_lora, "q_lora_rank None"),
        (_layer_norm, "input_layernorm is a LayerNorm"),
        (_rope, "rope is not traditional"),
    ],
)
def test_check_says_why_a_layer_does_not_fit(fresh_q4, change, why):
    change(fresh_q4)
    result = zmlx.patch(fresh_q4, patterns=["mla_prologue"])
    zmlx.unpatch(fresh_q4)
    report = result.patterns["mla_prologue"]
    assert [(p, w[: len(why)]) for p, w in report.skipped] == [("model.layers.1", why)]
    assert len(report.patched) == fresh_q4.args.num_hidden_layers - 1


def test_an_mxfp4_model_is_skipped_with_the_reason():
    model, _ = synth.build("synth:glm4_moe_lite/tiny/mxfp4")
    report = zmlx.patch(model, patterns=["mla_prologue"]).patterns["mla_prologue"]
    zmlx.unpatch(model)
    assert report.patched == [] and len(report.skipped) == model.args.num_hidden_layers
    assert all("mxfp4" in why for _, why in report.skipped), report.skipped


def test_a_layer_that_is_gone_takes_its_prepared_blocks_with_it():
    check_a_layer_that_is_gone_takes_its_prepared_blocks_with_it(mla_prologue, PROMPT)


# ---------------------------------------------------------------- on the GPU (the lead runs these)


def _teacher_forced(model, prompt, tokens):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    outs = [model(prompt, cache=cache)] + [model(t, cache=cache) for t in tokens]
    mx.eval(outs)
    return outs


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["tiny_q4", "tiny_f32", "deepseek_v3", "kimi_k25"])
def test_on_the_gpu_every_layer_runs_its_kernels_bitwise_mlx_lm(request, no_stock_attention, which):
    """One sequence (the kernels' regime on CUDA): each layer's two launches are the fused
    kernels (no reference, no mlx-lm fallback), alone and with moe_block, and the logits are
    stock's bitwise, greedy and teacher-forced (the DeepSeek-V3 family with YaRN)."""
    mx.set_default_device(mx.gpu)  # blocks_on_the_cpu puts the CPU back afterwards
    if which in YARN:
        model = build(which, "affine4", True, cuda_widths=True)  # widths stock serves on CUDA
    else:
        model, _ = request.getfixturevalue(which)
    stock = greedy_logits(model, PROMPT, 6)
    tokens = [mx.argmax(x[:, -1:], axis=-1) for x in stock[:-1]]
    for patterns in (["mla_prologue"], ["mla_prologue", "moe_block"]):
        mla_prologue._BLOCKS.clear()
        result = zmlx.patch(model, patterns=patterns)
        try:
            patched, forced, plans = (
                greedy_logits(model, PROMPT, 6),
                _teacher_forced(model, PROMPT, tokens),
                _plans(model),
            )
        finally:
            zmlx.unpatch(model)
        report = result.patterns["mla_prologue"]
        assert (report.path, report.fidelity) == ("kernel", "exact"), report.fallbacks
        assert all(list(p.values()) == [f"kernel: {LAUNCHES}"] for p in plans), plans
        assert same(stock, patched) and same(stock, forced), patterns
