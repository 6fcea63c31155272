"""mla_prologue with quant.QMM_ORDER: where its launch takes the call, the second launch is
mla_q_prep_embed (embed_q in qmm_sm80's order and SDPA's query scale in it) and the pattern runs
the rest of MLX's attention fallback itself (`_attention_after_scale`). On the CPU the launch
runs its reference (stock's ops), so every step is bitwise stock there: the fallback's ops are
MLX's own, in its order. `cuda`: a model with 8 heads (stock's embed_q on qmm_sm80) runs both
kernels, bitwise stock."""

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import pytest
from block_helpers import same
from mlx.utils import tree_flatten, tree_unflatten
from test_family_exactness import CONFIGS, CUDA_WIDTHS, YARN, _random_like, build

import zmlx
from zmlx.fidelity import greedy_logits
from zmlx.kernels import quant
from zmlx.patch.patterns import mla_prologue

PROMPT = mx.array([[3, 14, 15, 92, 65, 35, 89]])
EMBEDDED = "norm_qkv_a, mla_q_prep_embed"
ON_THE_CPU = f"reference: {EMBEDDED} (custom kernels do not run on MLX's CPU backend)"


pytestmark = pytest.mark.usefixtures("embedded_prologues")


def _layers(model):
    return model.language_model.model.layers if hasattr(model, "language_model") else model.model.layers


def _run(model, prompt, steps, patterns):
    result = zmlx.patch(model, patterns=patterns)
    try:
        plans = None
        logits = greedy_logits(model, prompt, steps)
        plans = [mla_prologue.decode_plan(layer) for layer in _layers(model)]
        return result, logits, plans
    finally:
        zmlx.unpatch(model)


@pytest.mark.parametrize("heads", [1, 3, 20])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_the_fallback_after_the_scale_is_mlxs_attention(heads, dtype):
    """_attention_after_scale(T(scale) * q, kv, mask) is mx.fast's attention of q over kv with
    that scale and additive mask, bitwise (MLX's CPU runs its fallback)."""
    ks = mx.random.split(mx.random.key(heads), 3)
    q = mx.random.normal((2, heads, 1, 256), key=ks[0]).astype(dtype)
    kv = mx.random.normal((2, 1, 37, 256), key=ks[1]).astype(dtype)
    mask = mx.random.normal((2, heads, 1, 37), key=ks[2]).astype(dtype)
    scale = 0.0721
    want = mx.fast.scaled_dot_product_attention(q, kv, kv, scale=scale, mask=mask)
    got = mla_prologue._attention_after_scale(mx.array(scale, dtype) * q, kv, mask)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert mx.array_equal(got, want).item()


@pytest.mark.parametrize("which", ["tiny_q4", "tiny_f32"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(
    "patterns", [["mla_prologue"], ["mla_prologue", "moe_block"]], ids=["alone", "with_moe"]
)
def test_decodes_bitwise_stock_with_embed_q_in_its_launch(
    request, no_stock_attention, which, batch, patterns
):
    model, _ = request.getfixturevalue(which)
    prompt = mx.random.randint(1, model.args.vocab_size, (batch, 7), key=mx.random.key(batch))
    stock = greedy_logits(model, prompt, 5)
    _, patched, plans = _run(model, prompt, 5, patterns)
    assert same(stock, patched)
    assert [list(p.values()) for p in plans] == [[ON_THE_CPU]] * model.args.num_hidden_layers


@pytest.mark.parametrize("family", sorted(YARN))
@pytest.mark.parametrize("yarn", [False, True])
def test_the_deepseek_family_decodes_bitwise_stock_with_it(no_stock_attention, family, yarn):
    model = build(family, "affine4", yarn)
    prompt = mx.random.randint(1, 512, (2, 7), key=mx.random.key(3))
    stock = greedy_logits(model, prompt, 3)
    _, patched, plans = _run(model, prompt, 3, ["mla_prologue", "moe_block"])
    assert same(stock, patched)
    assert [list(p.values()) for p in plans] == [[ON_THE_CPU]] * len(_layers(model))


def test_its_q_s_output_is_on_the_decode_path(tiny_q4, monkeypatch):
    """embed_q's output times the scale feeds the attention: off by 1% moves the logits."""
    model, _ = tiny_q4
    _, honest, _ = _run(model, PROMPT, 2, ["mla_prologue"])
    k = mla_prologue.mla_q_prep_embed

    def off(*a, **kw):
        out = list(k.reference(*a, **kw))
        out[0] = out[0] * 1.01
        return tuple(out)

    monkeypatch.setattr(mla_prologue, "mla_q_prep_embed", dataclasses.replace(k, reference=off))
    mla_prologue._BLOCKS.clear()
    _, patched, _ = _run(model, PROMPT, 2, ["mla_prologue"])
    assert same(honest[:1], patched[:1])
    assert not mx.array_equal(honest[1], patched[1]).item()


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_steps_with_it_equal_those_without(tiny_q4, monkeypatch, batch):
    """Inside compiled_decode's traced step (a static cache, its mask of valid positions) the
    embedded launch and the fallback's ops give what mlx-lm's embed_q and attention give."""
    model, _ = tiny_q4
    prompt = mx.random.randint(1, model.args.vocab_size, (batch, 7), key=mx.random.key(7))
    patterns = ["mla_prologue", "moe_block", "compiled_decode"]
    _, embedded, plans = _run(model, prompt, 4, patterns)
    assert any(ON_THE_CPU in p.values() for p in plans)
    monkeypatch.setattr(quant, "QMM_ORDER", False)
    mla_prologue._BLOCKS.clear()
    _, plain, _ = _run(model, prompt, 4, patterns)
    assert same(plain, embedded)


@pytest.mark.parametrize("backend,embedded", [("cpu", True), ("cuda", True), ("metal", False)])
def test_the_embedded_launch_is_tried_where_stock_runs_the_fallback(monkeypatch, backend, embedded):
    """With an array mask (the rope scores) stock's decode attention is MLX's fallback on CUDA
    (no cuDNN, no vector kernel) and the CPU; on Metal embed_q stays mlx-lm's (the nope launch)."""
    tried = []
    real = mla_prologue.mla_layer.prologue

    def spy(layer, x, be, qkv_kernel, q_kernel, embed):
        tried.append(q_kernel.name)
        return real(layer, x, "cpu", qkv_kernel, q_kernel, embed)

    monkeypatch.setattr(mla_prologue.mla_layer, "prologue", spy)
    model = build("deepseek_v3", "affine4", False)
    layer = _layers(model)[0]
    made = mla_prologue._build(layer, mx.zeros((1, 1, model.args.hidden_size), mx.bfloat16), backend)
    assert tried[0] == ("mla_q_prep_embed" if embedded else "mla_q_prep_nope")
    assert made.embedded is embedded


def _wide_latent_model(family: str = "deepseek_v3") -> nn.Module:
    """test_family_exactness's tiny model at CUDA's widths with 8 heads (stock's embed_q on
    qmm_sm80) and a latent of 256, affine 4-bit, bf16."""
    import importlib

    config = {**CONFIGS[family], **CUDA_WIDTHS, "num_attention_heads": 8, "num_key_value_heads": 8}
    config["kv_lora_rank"] = 256
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    new = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        keep_f32 = name.endswith("e_score_correction_bias")
        v = _random_like(name, p, mx.random.key(7000 + i))
        new.append((name, v.astype(mx.float32 if keep_f32 else mx.bfloat16)))
    model.update(tree_unflatten(new))
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


@pytest.mark.cuda
def test_on_the_gpu_both_launches_are_kernels_and_bitwise_stock(no_stock_attention):
    mx.set_default_device(mx.gpu)  # blocks_on_the_cpu puts the CPU back afterwards
    model = _wide_latent_model()
    stock, again = greedy_logits(model, PROMPT, 6), greedy_logits(model, PROMPT, 6)
    assert same(stock, again)  # stock repeats itself at these widths
    for patterns in (["mla_prologue"], ["mla_prologue", "moe_block"]):
        mla_prologue._BLOCKS.clear()
        _, patched, plans = _run(model, PROMPT, 6, patterns)
        assert all(list(p.values()) == [f"kernel: {EMBEDDED}"] for p in plans), plans
        assert same(stock, patched), patterns
