"""mla_block: the decoder layer's attention half at decode through norm_qkv_a, mla_q_prep,
mlx-lm's cache update, mla_decode and mla_unembed, then o_proj; and its composition with
moe_block on the same layers (zmlx.patch.layer). On the CPU the launches run their
references: norm_qkv_a and mla_q_prep's q_pe / kv_latent / k_pe are stock's op sequence, but
mla_decode and mla_unembed are float32 computations (and qv is stock's embed_q widened), so the
patched model is close to stock, not bitwise; where a step runs mlx-lm's code it is bitwise."""

import copy
import dataclasses
import pickle

import mlx.core as mx
import mlx.nn as nn
import pytest
from block_helpers import (
    block_plans,
    check_a_copy_runs_patched,
    check_a_launch_that_skips_runs_mlx_lm_once_per_layer,
    check_a_layer_that_is_gone_takes_its_prepared_blocks_with_it,
    check_a_prompt_runs_mlx_lms_layer,
    check_presets,
    patched_run,
    same,
    snapshot,
)
from mlx_lm.models import glm4_moe_lite
from mlx_lm.models.cache import RotatingKVCache

import zmlx
from zmlx import accuracy as acc
from zmlx import synth
from zmlx.config import PatchConfig
from zmlx.fidelity import generate, greedy_logits
from zmlx.patch import layer as shared_layer
from zmlx.patch.patterns import mla_block, moe_block

PROMPT = mx.array([[3, 14, 15, 92, 65, 35, 89]])
LAUNCHES = "norm_qkv_a, mla_q_prep, mla_decode, mla_unembed"
ON_THE_CPU = f"reference: {LAUNCHES} (custom kernels do not run on MLX's CPU backend)"


pytestmark = pytest.mark.usefixtures("blocks_on_the_cpu")


def _close(stock, patched):
    """Per decode step, the mean |patched - stock| logit at most 0.35 x the mean |stock| logit.
    The attention runs in float32 where stock rounds every step to bf16; on the tiny model's
    random routers such a difference flips an expert now and then, which moves a step's logits
    by up to ~0.2 of their mean size (mla_attention's float32 attention alike); an attention
    that reads the wrong heads moves them by ~1.0 (`test_the_comparison_sees_heads_swapped`).
    Compare teacher-forced runs (`_steps`): greedy runs part at the first flipped token and
    then compare different texts. The accuracy rule judges the rest (its own test)."""
    assert len(stock) == len(patched)
    for s, p in zip(stock, patched):
        s, p = s.astype(mx.float32), p.astype(mx.float32)
        assert (mx.abs(s - p).mean() <= 0.35 * mx.abs(s).mean()).item()


def _steps(model, prompt, tokens):
    """The logits of `prompt` through a fresh prompt cache, then of each of `tokens` ((B, 1)
    arrays: stock's greedy choices) fed one at a time: the decode path, teacher-forced."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    outs = [model(prompt, cache=cache)]
    outs += [model(t, cache=cache) for t in tokens]
    mx.eval(outs)
    return outs


def _greedy_tokens(logits):
    return [mx.argmax(x[:, -1:], axis=-1) for x in logits[:-1]]


@pytest.mark.parametrize("which", ["tiny_q4", "tiny_f32"])
@pytest.mark.parametrize("batch", [1, 2])
def test_mla_block_decodes_close_to_stock_through_its_launches(request, which, batch):
    model, _ = request.getfixturevalue(which)
    prompt = mx.random.randint(1, model.args.vocab_size, (batch, 7), key=mx.random.key(batch))
    stock = greedy_logits(model, prompt, 6)
    tokens = _greedy_tokens(stock)
    result = zmlx.patch(model, patterns=["mla_block"])
    try:
        patched, plans = _steps(model, prompt, tokens), block_plans(model, mla_block)
    finally:
        zmlx.unpatch(model)
    assert len(result.patterns["mla_block"].patched) == model.args.num_hidden_layers
    assert same(stock[:1], patched[:1])  # the prompt: mlx-lm's own layer
    assert not same(stock[1:2], patched[1:2])  # a decode step: the float32 attention
    _close(stock, patched)
    assert [list(p.values()) for p in plans] == [[ON_THE_CPU]] * model.args.num_hidden_layers


def test_the_comparison_sees_heads_swapped(tiny_q4, monkeypatch):
    """`_close` fails for an attention output with its heads in reverse order."""
    model, _ = tiny_q4
    stock = greedy_logits(model, PROMPT, 3)
    k = mla_block.mla_unembed
    swapped = dataclasses.replace(k, reference=lambda *a, **kw: k.reference(*a, **kw)[:, ::-1])
    monkeypatch.setattr(mla_block, "mla_unembed", swapped)
    zmlx.patch(model, patterns=["mla_block"])
    try:
        patched = _steps(model, PROMPT, _greedy_tokens(stock))
    finally:
        zmlx.unpatch(model)
    with pytest.raises(AssertionError):
        _close(stock, patched)


@pytest.mark.parametrize("kernel", ["norm_qkv_a", "mla_q_prep", "mla_decode", "mla_unembed"])
def test_every_launch_is_on_the_decode_path(tiny_q4, monkeypatch, kernel):
    """The decode steps go through each of the four launches: one whose first output is off
    by 1% moves the logits (the prompt, mlx-lm's layer, does not move)."""
    model, _ = tiny_q4
    _, honest, _ = patched_run(mla_block, model, PROMPT, 2)
    k = getattr(mla_block, kernel)

    def off(*a, **kw):
        out = k.reference(*a, **kw)
        return (out[0] * 1.01, *out[1:]) if isinstance(out, tuple) else out * 1.01

    monkeypatch.setattr(mla_block, kernel, dataclasses.replace(k, reference=off))
    mla_block._BLOCKS.clear()  # prepared again, with the changed kernel
    _, patched, _ = patched_run(mla_block, model, PROMPT, 2)
    assert same(honest[:1], patched[:1])
    assert not mx.array_equal(honest[1], patched[1]).item()


def test_on_the_calm_model_it_is_as_near_the_float32_model_as_stock_on_the_cpu():
    """Teacher-forced over 2 x 100 of stock's greedy tokens on the calm tiny model (where bf16
    sits ~0.007 nats from float32, so the comparison has power): mla_block changes the numbers,
    and its distance to the float32 reference exceeds stock's by less than three standard
    errors of the paired per-position difference. (On the chaotic `tiny` model, ~0.17 nats
    away, the rule's verdict turned on how the prompt was fed: a sample, not the kernel.)"""
    model, tok = synth.build("synth:glm4_moe_lite/tiny-calm/affine4")
    prompts = ["The quick brown fox jumps over the lazy dog and then", "Once upon a time in a small village"]
    seqs = []
    for text in prompts:
        ids = mx.array(tok.encode(text))
        seqs.append((ids, generate(model, tok, ids, 100).tokens))
    a = acc.accuracy(model, *seqs[0], patterns=["mla_block"], also=seqs[1:])
    assert a.stock_patched.kld_mean > 0  # it does change the numbers
    assert a.excess is not None and a.excess.positions == 200
    assert a.excess.mean < 3 * a.excess.sem, a.excess


# ---------------------------------------------------------------- composition with moe_block


def _run_both(model, patterns):
    """(PatchResult, greedy logits, each block pattern's plans read before unpatching)."""
    result = zmlx.patch(model, patterns=patterns)
    try:
        logits = greedy_logits(model, PROMPT, 4)
        return result, logits, {b: block_plans(model, b) for b in (mla_block, moe_block)}
    finally:
        zmlx.unpatch(model)


def test_with_moe_block_each_half_runs_its_launches(tiny_q4):
    """Both on: the attention half is mla_block's (so the logits are those of mla_block alone)
    and the MoE half moe_block's, bitwise stock's MoE on the CPU; each alone; neither."""
    model, _ = tiny_q4
    stock = greedy_logits(model, PROMPT, 4)
    result, attention_only, plans = patched_run(mla_block, model, PROMPT, 4)
    assert "moe_block" not in result.patterns and all(plans)
    assert block_plans(model, moe_block) == [{}] * model.args.num_hidden_layers

    result, both, plans = _run_both(model, ["moe_block", "mla_block"])
    layers = [f"model.layers.{i}" for i in range(model.args.num_hidden_layers)]
    assert result.patterns["moe_block"].patched == result.patterns["mla_block"].patched == layers
    assert same(both, attention_only)  # moe_block's half is bitwise mlx-lm's MoE here
    assert all(plans[mla_block]) and all(plans[moe_block])

    _, moe_only, plans = _run_both(model, ["moe_block"])
    assert same(moe_only, stock) and plans[mla_block] == [{}] * model.args.num_hidden_layers
    result, neither, _ = patched_run(mla_block, model, PROMPT, 4, [])
    assert not result.patterns and same(neither, stock)


def test_both_halves_make_one_function_whatever_the_order(tiny_q4):
    model, _ = tiny_q4
    want = shared_layer.make(attention=mla_block.attention_half, moe=moe_block.moe_half, renorm_eps=1e-20)
    for order in (["moe_block", "mla_block"], ["mla_block", "moe_block"]):
        zmlx.patch(model, patterns=order)
        try:
            assert all(type(layer).__call__ is want for layer in model.model.layers)
        finally:
            zmlx.unpatch(model)
    zmlx.patch(model, patterns=["mla_block"])
    try:
        alone = shared_layer.make(attention=mla_block.attention_half)
        assert type(model.model.layers[0]).__call__ is alone is not want
    finally:
        zmlx.unpatch(model)


def test_patch_and_unpatch_leave_the_model_as_it_was(tiny_q4):
    model, _ = tiny_q4
    before = snapshot(model)
    zmlx.patch(model, patterns=["mla_block", "moe_block", "mla_attention"])
    assert type(model.model.layers[1]) is not glm4_moe_lite.Glm4MoeLiteDecoderLayer
    assert isinstance(model.model.layers[1], glm4_moe_lite.Glm4MoeLiteDecoderLayer)
    greedy_logits(model, PROMPT, 2)  # prepared blocks live outside the modules
    zmlx.unpatch(model)
    assert snapshot(model) == before
    assert all(type(layer) is glm4_moe_lite.Glm4MoeLiteDecoderLayer for layer in model.model.layers)


@pytest.mark.parametrize(
    "copier", [lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy], ids=["pickle", "deepcopy"]
)
@pytest.mark.parametrize("patterns", [["mla_block"], ["mla_block", "moe_block"]], ids=["alone", "with_moe"])
def test_a_patched_model_copies_patched(tiny_q4, copier, patterns):
    model, _ = tiny_q4
    zmlx.patch(model, patterns=patterns)
    try:
        patched = greedy_logits(model, PROMPT, 2)
        check_a_copy_runs_patched(mla_block, model, copier(model), PROMPT, patched)
    finally:
        zmlx.unpatch(model)


def test_excluding_mla_block_keeps_moe_block_and_its_flag_adds_it(tiny_q4):
    model, _ = tiny_q4
    result = zmlx.patch(model, patterns=["mla_block", "moe_block"], exclude=["mla_block"])
    try:
        assert result.not_selected["mla_block"] == "excluded" and "mla_block" not in result.patterns
        assert type(model.model.layers[0]).__call__ is shared_layer.make(
            moe=moe_block.moe_half, renorm_eps=1e-20
        )
    finally:
        zmlx.unpatch(model)
    flag = PatchConfig.from_env({"ZMLX_MLA_BLOCK": "1"})
    result = zmlx.patch(model, config=flag)
    assert len(result.patterns["mla_block"].patched) == model.args.num_hidden_layers
    assert "moe_block" not in result.patterns  # its own flag, not this one
    assert zmlx.patch(model, exclude="mla_block", config=flag).not_selected["mla_block"] == "excluded"
    zmlx.unpatch(model)


def test_the_report_says_close_for_mla_block_and_exact_for_moe_block(tiny_q4):
    model, _ = tiny_q4
    result = zmlx.patch(model, patterns=["mla_block", "moe_block"])
    zmlx.unpatch(model)
    n = model.args.num_hidden_layers
    mla, moe = result.patterns["mla_block"], result.patterns["moe_block"]
    assert (mla.fidelity, mla.path, len(mla.patched), mla.skipped) == ("close", "reference", n, [])
    assert (moe.fidelity, moe.path, len(moe.patched), moe.skipped) == ("exact", "reference", n, [])
    assert result.close == ["mla_block"]
    assert f"mla_block (close): patched {n}" in str(result) and f"moe_block (exact): patched {n}" in str(
        result
    )
    p = zmlx.PATTERNS["mla_block"]
    assert p.fidelity == "close" and p.paths == ("decode",)
    # mla_decode_len: mla_decode over a static cache in compiled_decode's step
    assert {k.name for k in p.kernels} == set(LAUNCHES.split(", ")) | {"mla_decode_len"}


def test_mla_block_is_in_cudas_fast_preset_alone():
    check_presets(mla_block, fast_on=("cuda",))  # ACCURATE there (b6e4c5fa57)


def test_residual_norm_yields_to_mla_block(tiny_q4):
    model, _ = tiny_q4
    result, _, plans = patched_run(mla_block, model, PROMPT, 2, ["mla_block", "residual_norm"])
    assert result.patterns["residual_norm"].skipped == [
        ("*", "mla_block is applied and this pattern would bypass it")
    ]
    assert all(plans)  # the layers' blocks ran: no model loop went around them


# ---------------------------------------------------------------- outside the regime: mlx-lm's code


def test_a_prompt_runs_mlx_lms_layer(tiny_q4):
    check_a_prompt_runs_mlx_lms_layer(mla_block, tiny_q4[0], PROMPT)


def _rotating_steps(model, steps):
    cache = [RotatingKVCache(max_size=64) for _ in model.model.layers]
    logits = model(PROMPT, cache=cache)
    outs = [logits]
    for _ in range(steps):
        logits = model(mx.argmax(logits[:, -1:], axis=-1), cache=cache)
        outs.append(logits)
    mx.eval(outs)
    return outs


def test_other_caches_and_masks_run_mlx_lms_attention(tiny_q4):
    model, _ = tiny_q4
    stock = _rotating_steps(model, 3)
    layer = model.model.layers[1]
    x = mx.random.normal((1, 1, model.args.hidden_size), key=mx.random.key(5)).astype(mx.bfloat16)
    mask = mx.array([[True]])
    stock_masked = layer(x, mask, None)
    zmlx.patch(model, patterns=["mla_block"])
    try:
        assert same(_rotating_steps(model, 3), stock)
        assert mx.array_equal(layer(x, mask, None), stock_masked).item()
        assert block_plans(model, mla_block) == [{}] * model.args.num_hidden_layers  # nothing prepared
    finally:
        zmlx.unpatch(model)


def test_a_launch_that_skips_runs_mlx_lms_attention_and_is_decided_once(tiny_q4, monkeypatch):
    model, _ = tiny_q4
    check_a_launch_that_skips_runs_mlx_lm_once_per_layer(monkeypatch, mla_block, "mla_decode", model, PROMPT)


def test_each_layer_prepares_once_per_shape_and_again_for_new_weights(fresh_q4, monkeypatch):
    model = fresh_q4
    built = []
    real = mla_block._build
    monkeypatch.setattr(mla_block, "_build", lambda *a: built.append(1) or real(*a))
    layers = model.args.num_hidden_layers
    attn = model.model.layers[2].self_attn
    scales = attn.q_b_proj.scales
    attn.q_b_proj.scales = mx.array(scales * 2)
    stock = greedy_logits(model, PROMPT, 3)  # with the new weights (unpatched: unpatch forgets)
    attn.q_b_proj.scales = scales
    zmlx.patch(model, patterns=["mla_block"])
    try:
        greedy_logits(model, PROMPT, 4)
        assert len(built) == layers
        attn.q_b_proj.scales = mx.array(scales * 2)
        patched = _steps(model, PROMPT, _greedy_tokens(stock))
        assert len(built) == layers + 1  # only that layer, again
    finally:
        zmlx.unpatch(model)
    _close(stock, patched)


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


@pytest.mark.parametrize(
    "change, why",
    [
        (_bias, "kv_a_proj_with_mqa has a bias"),
        (_eps, "q_a_layernorm and kv_a_layernorm have different eps"),
        (_no_q_lora, "q_lora_rank None"),
        (_layer_norm, "input_layernorm is a LayerNorm"),
    ],
)
def test_check_says_why_a_layer_does_not_fit(fresh_q4, change, why):
    change(fresh_q4)
    result = zmlx.patch(fresh_q4, patterns=["mla_block"])
    zmlx.unpatch(fresh_q4)
    report = result.patterns["mla_block"]
    assert [(p, w[: len(why)]) for p, w in report.skipped] == [("model.layers.1", why)]
    assert len(report.patched) == fresh_q4.args.num_hidden_layers - 1


def test_an_mxfp4_model_is_skipped_with_the_reason():
    model, _ = synth.build("synth:glm4_moe_lite/tiny/mxfp4")
    result = zmlx.patch(model, patterns=["mla_block"])
    report = result.patterns["mla_block"]
    assert report.patched == [] and len(report.skipped) == model.args.num_hidden_layers
    assert all("mxfp4" in why for _, why in report.skipped), report.skipped


def test_a_layer_that_is_gone_takes_its_prepared_blocks_with_it():
    check_a_layer_that_is_gone_takes_its_prepared_blocks_with_it(mla_block, PROMPT)


# ---------------------------------------------------------------- on the GPU (the lead runs these)


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["tiny_q4", "tiny_f32"])
def test_on_the_gpu_every_layer_runs_its_kernels_close_to_stock(request, which):
    """One sequence (the kernels' regime on CUDA): each layer's launches are the fused kernels
    (no reference, no mlx-lm fallback), alone and with moe_block, and the logits stay within
    mla_attention's tolerance of stock's."""
    mx.set_default_device(mx.gpu)  # blocks_on_the_cpu puts the CPU back afterwards
    model, _ = request.getfixturevalue(which)
    stock = greedy_logits(model, PROMPT, 6)
    for patterns in (["mla_block"], ["mla_block", "moe_block"]):
        mla_block._BLOCKS.clear()
        result = zmlx.patch(model, patterns=patterns)
        try:
            patched, plans = _steps(model, PROMPT, _greedy_tokens(stock)), block_plans(model, mla_block)
        finally:
            zmlx.unpatch(model)
        assert result.patterns["mla_block"].path == "kernel", result.patterns["mla_block"].fallbacks
        assert all(list(p.values()) == [f"kernel: {LAUNCHES}"] for p in plans), plans
        _close(stock, patched)


@pytest.mark.cuda
def test_on_the_gpu_the_accuracy_rule_judges_it_accurate(tiny_q4):
    mx.set_default_device(mx.gpu)
    model, tok = tiny_q4
    ids = mx.array(tok.encode("The quick brown fox jumps over the lazy dog and then"))
    tokens = generate(model, tok, ids, 64).tokens
    a = acc.accuracy(model, ids, tokens, patterns=["mla_block"])
    assert a.accurate, (a.reasons, a.to_dict())
