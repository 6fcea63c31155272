"""gpt-oss through zmlx.synth's tiny checkpoint (as `mlx_lm.load` reads it: sinks, alternating
sliding-window layers whose rotating cache wraps, a biased router, biased experts with the
clamped SwiGLU), in bf16, affine 4-bit and mxfp4 (the released models' experts): patch then
unpatch leaves the same objects, the default preset patches nothing without a warning, and
with softmax_router and moe_mlp (alone and together) the quantized models' logits are bitwise
stock on the CPU for prompts and decode steps, batch 1 and 2, with and without a cache. The
tiny models built from mlx-lm's classes are in test_family_exactness.py and test_families.py."""

from __future__ import annotations

import functools
import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.switch_layers import SwitchGLU
from test_family_exactness import forward

import zmlx
from zmlx import synth
from zmlx.patch.patterns import moe_mlp

QUANTS = ["bf16", "affine4", "mxfp4"]


@functools.cache
def _model(quant: str):
    model, _ = synth.build(f"synth:gpt_oss/tiny/{quant}")
    return model


def _state(model):
    return [(p, type(m)) for p, m in model.named_modules()], [(k, id(v)) for k, v in tree_flatten(model)]


@pytest.mark.parametrize("quant", QUANTS)
def test_patch_then_unpatch_leaves_the_synth_model_as_it_was(quant):
    model = _model(quant)
    before = _state(model)
    result = zmlx.patch(model, patterns=["softmax_router", "moe_mlp"])
    layers = len(model.layers)
    assert result.patterns["softmax_router"].patched == [f"model.layers.{i}.mlp" for i in range(layers)]
    assert type(model.layers[0].mlp).__zmlx_original__.__name__ == "MLPBlock"
    # every layer's experts, the released models' mxfp4 ones too
    assert result.patterns["moe_mlp"].patched == [f"model.layers.{i}.mlp.experts" for i in range(layers)]
    zmlx.unpatch(model)
    assert _state(model) == before


def test_default_preset_patches_nothing_without_a_warning():
    model = _model("affine4")
    with warnings.catch_warnings():
        warnings.simplefilter("error", zmlx.ZmlxWarning)
        result = zmlx.patch(model)
    zmlx.unpatch(model)
    assert result.family == "gpt_oss" and result.patched_modules == 0
    assert "nothing to patch" not in result.message


@functools.cache
def _stock(quant: str, batch: int, use_cache: bool):
    """(prompt, stock's logits): a prompt longer than the window, then decode steps (the
    rotating cache wraps); computed once for the pattern sets that compare with it (patch then
    unpatch leaves the model as it was: the test above)."""
    model = _model(quant)
    prompt = mx.random.randint(1, 4096, (batch, model.args.sliding_window + 3), key=mx.random.key(batch))
    return prompt, forward(model, prompt, 3, use_cache)


@pytest.mark.parametrize("quant", ["affine4", "mxfp4"])  # MLX's CPU gather_mm takes float32 only
@pytest.mark.parametrize("patterns", [("softmax_router",), ("moe_mlp",), ("softmax_router", "moe_mlp")])
def test_patched_synth_model_is_bitwise_stock(quant, patterns):
    model = _model(quant)
    for batch, use_cache in ((1, True), (2, True), (1, False), (2, False)):
        prompt, stock = _stock(quant, batch, use_cache)
        result = zmlx.patch(model, patterns=list(patterns))
        try:
            patched = forward(model, prompt, 3, use_cache)
        finally:
            zmlx.unpatch(model)
        for name in patterns:
            report = result.patterns[name]
            assert report.fidelity == "exact" and len(report.patched) == len(model.layers), name
        for s, p in zip(stock, patched, strict=True):
            assert s.dtype == p.dtype and mx.array_equal(s, p).item(), (quant, batch, use_cache)


def _experts(*modes) -> SwitchGLU:
    """gpt-oss's experts (biases, SwigluOAI), gate_proj and up_proj quantized as `modes` say
    ((mode, bits, group) each; None: unquantized)."""
    switch = SwitchGLU(64, 32, 4, activation=SwigluOAI(), bias=True)
    for name, m in zip(("gate_proj", "up_proj"), modes, strict=True):
        if m is not None:
            setattr(switch, name, getattr(switch, name).to_quantized(m[2], m[1], mode=m[0]))
    return switch


MX = ("mxfp4", 4, 32)


@pytest.mark.parametrize(
    "modes,why",
    [
        ((MX, MX), None),
        ((("affine", 4, 32), ("affine", 4, 32)), None),
        ((None, None), None),
        ((("mxfp8", 8, 32),) * 2, "gate_proj is mxfp8-quantized (affine or mxfp4 only)"),
        ((("nvfp4", 4, 16),) * 2, "gate_proj is nvfp4-quantized (affine or mxfp4 only)"),
        ((MX, ("affine", 4, 32)), "gate_proj and up_proj are quantized differently"),
        ((MX, None), "gate_proj and up_proj are quantized differently"),
    ],
)
def test_moe_mlp_takes_mxfp4_experts_and_says_why_not_for_the_rest(modes, why):
    """The kernel reads mxfp4 as it reads affine (csrc/quant.h's overload): gpt-oss's released
    experts pass the check; the modes it does not read, and gate and up quantized apart, keep
    their reasons."""
    assert moe_mlp.check(_experts(*modes), {}) == why


def test_moe_mlp_keeps_swiglu_experts_affine_or_unquantized():
    """mxfp4 goes through moe_mlp for gpt-oss's experts only: SwiGLU experts (GLM's, DeepSeek's)
    keep the module patterns' affine-only reason (moe_block takes their mxfp4)."""
    switch = SwitchGLU(64, 32, 4)
    nn.quantize(switch, group_size=32, bits=4, mode="mxfp4")
    assert moe_mlp.check(switch, {}) == "gate_proj is mxfp4-quantized (affine only)"


@pytest.mark.cuda
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("patterns", [("softmax_router",), ("moe_mlp",), ("softmax_router", "moe_mlp")])
def test_on_cuda_patched_synth_model_is_bitwise_stock(quant, patterns):
    """On the GPU the kernels run (softmax_router's routing, moe_mlp's biases and SwigluOAI at
    decode): the logits stay bitwise stock's, batch 1 and 2, the rotating cache wrapping."""
    from zmlx.kernels.moe_mlp import moe_mlp
    from zmlx.kernels.softmax_router import softmax_router

    for kernel in (softmax_router, moe_mlp):
        assert kernel.plan("cuda").path == "kernel", kernel.plan("cuda").reason
    model = _model(quant)
    window = model.args.sliding_window
    for batch in (1, 2):
        prompt = mx.random.randint(1, 4096, (batch, window + 3), key=mx.random.key(batch))
        stock = forward(model, prompt, 8, True)
        again = forward(model, prompt, 8, True)  # else a comparison with stock means nothing
        same = [mx.array_equal(s, a).item() for s, a in zip(stock, again, strict=True)]
        assert all(same), f"stock is not deterministic here: steps {same}"
        result = zmlx.patch(model, patterns=list(patterns))
        try:
            patched = forward(model, prompt, 8, True)
        finally:
            zmlx.unpatch(model)
        for name in patterns:
            report = result.patterns[name]
            assert report.path == "kernel" and report.fidelity == "exact", (name, report)
        for s, p in zip(stock, patched, strict=True):
            assert mx.array_equal(s, p).item(), (quant, patterns, batch)
