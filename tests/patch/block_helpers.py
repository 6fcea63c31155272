"""What the block patterns' tests (moe_block, mla_block) share: runs of a patched model and the
checks that every block pattern passes the same way. A block is its pattern's module
(zmlx.patch.patterns.moe_block or mla_block)."""

import dataclasses
import gc

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import glm4_moe_lite

import zmlx
from zmlx import synth
from zmlx.config import PatchConfig
from zmlx.fidelity import greedy_logits
from zmlx.kernels.core import Skip
from zmlx.patch import select_patterns
from zmlx.patch.patterns import moe_block


def same(a, b) -> bool:
    """Two runs' logits are bitwise equal, step by step."""
    return len(a) == len(b) and all(mx.array_equal(x, y).item() for x, y in zip(a, b))


def name(block) -> str:
    return block.__name__.rpartition(".")[2]


def block_plans(model, block) -> list[dict]:
    """Each layer's decode plan under `block`."""
    return [block.decode_plan(layer) for layer in model.model.layers]


def patched_run(block, model, prompt, steps, patterns=None, **kw):
    """(PatchResult, greedy logits, `block`'s plans) of `model` patched with `patterns`
    (default: `block` alone), unpatched afterwards."""
    result = zmlx.patch(model, patterns=[name(block)] if patterns is None else list(patterns), **kw)
    try:
        return result, greedy_logits(model, prompt, steps), block_plans(model, block)
    finally:
        zmlx.unpatch(model)


def snapshot(model):
    """What patch and unpatch must leave as it was: every module's identity, type, attributes
    and children, every parameter's identity, the model's attributes."""
    mods = {p: (id(m), type(m), sorted(vars(m)), sorted(m.keys())) for p, m in model.named_modules()}
    return mods, {k: id(v) for k, v in tree_flatten(model.parameters())}, sorted(vars(model))


def check_a_prompt_runs_mlx_lms_layer(block, model, prompt):
    zmlx.patch(model, patterns=[name(block)])
    try:
        mx.eval(model(prompt))
        assert block_plans(model, block) == [{}] * model.args.num_hidden_layers  # nothing prepared
    finally:
        zmlx.unpatch(model)


def check_a_launch_that_skips_runs_mlx_lm_once_per_layer(monkeypatch, block, kernel: str, model, prompt):
    """`block`'s launch `kernel` skips: the decode steps run mlx-lm's code, bitwise, and the
    launch was asked once per layer, not once per step."""
    stock = greedy_logits(model, prompt, 3)
    asked = []

    def skipping(backend, *a, **k):
        asked.append(1)
        return Skip("not this shape (test)")

    monkeypatch.setattr(block, kernel, dataclasses.replace(getattr(block, kernel), launch=skipping))
    _, patched, layer_plans = patched_run(block, model, prompt, 3)
    assert same(stock, patched)
    assert all(list(p.values()) == ["mlx-lm (not this shape (test))"] for p in layer_plans)
    assert len(asked) == model.args.num_hidden_layers


def check_a_copy_runs_patched(block, model, twin, prompt, want):
    """`twin`, a copy of the patched `model`, decodes `want` through its own prepared blocks
    and unpatches on its own."""
    assert type(twin.model.layers[1]) is type(model.model.layers[1])
    assert same(greedy_logits(twin, prompt, 2), want)
    assert all(block_plans(twin, block))  # the copy runs its own prepared blocks
    zmlx.unpatch(twin)
    assert type(twin.model.layers[1]) is glm4_moe_lite.Glm4MoeLiteDecoderLayer


def check_a_layer_that_is_gone_takes_its_prepared_blocks_with_it(block, prompt):
    """The blocks hold the layer's weights: they must not outlive the model."""
    model, _ = synth.build("synth:glm4_moe_lite/tiny/affine4")
    zmlx.patch(model, patterns=[name(block)])
    greedy_logits(model, prompt, 1)
    assert len(block._BLOCKS) == model.args.num_hidden_layers
    del model
    gc.collect()
    assert block._BLOCKS == {}


def check_presets(block, with_it: tuple[str, ...] = (), fast_on: tuple[str, ...] = ()):
    """On glm4_moe_lite, `block` is in the default and fast presets of the backends `with_it`,
    in the fast preset alone of the backends `fast_on`, and in no other preset, which says so."""
    for backend in ("cpu", "cuda", "metal"):
        for preset in ("default", "fast"):
            chosen, why_not = select_patterns("glm4_moe_lite", None, None, PatchConfig(), backend, preset)
            if backend in with_it or (preset == "fast" and backend in fast_on):
                assert name(block) in chosen, (backend, preset)
            else:
                assert name(block) not in chosen
                assert why_not[name(block)].startswith(f"not in the {preset} preset")


def check_moe_block_is_bitwise_mlx_lm_on_the_cpu(model, batch: int):
    """A random prompt of `batch` sequences and 4 greedy steps: moe_block patches every layer,
    the logits are stock's bitwise, and at decode every layer ran its launches' references
    (the dense first layer's and the MoE layers')."""
    prompt = mx.random.randint(1, model.args.vocab_size, (batch, 7), key=mx.random.key(batch))
    stock = greedy_logits(model, prompt, 4)
    result, patched, layer_plans = patched_run(moe_block, model, prompt, 4)
    layers = model.args.num_hidden_layers
    assert len(result.patterns["moe_block"].patched) == layers
    assert same(stock, patched)
    assert [list(p.values()) for p in layer_plans] == [
        [f"reference: {names} (custom kernels do not run on MLX's CPU backend)"]
        for names in ["residual_norm, swiglu_mlp, moe_down"]
        + ["norm_router_gates, moe_gate_up_route, moe_down"] * (layers - 1)
    ]
