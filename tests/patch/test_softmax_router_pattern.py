"""The softmax_router pattern on Qwen3-MoE's, Mixtral's and gpt-oss's MoE blocks: it patches every
MoE layer, runs the kernel once per layer and forward (prompt and decode), keeps mlx-lm's
code around it (the k in the kernel's order reach the weighted sum), unpatches exactly, and
says why it skips a block. The families' bitwise checks on the CPU are in
test_family_exactness.py; the `cuda` test here checks the kernel inside the model on the GPU."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import pytest
from test_family_exactness import build, forward

import zmlx
from zmlx.kernels.softmax_router import reference, softmax_router
from zmlx.patch import PATTERNS
from zmlx.patch.patterns import softmax_router as pattern_module

FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]
PARAMS = {
    "qwen3_moe": {"softmax_first": True},
    "mixtral": {"softmax_first": False},
    "gpt_oss": {"softmax_first": False, "topk_last": True},
}
GATES = {"qwen3_moe": 16, "mixtral": 8, "gpt_oss": 8}  # experts of the tiny models
TOP_K = {"qwen3_moe": 4, "mixtral": 2, "gpt_oss": 4}


def _attr(family):
    return "block_sparse_moe" if family == "mixtral" else "mlp"


def _blocks(model, family):
    return [(i, getattr(layer, _attr(family))) for i, layer in enumerate(model.model.layers)]


def _moe_paths(model, family):
    moe = [i for i, b in _blocks(model, family) if hasattr(b, "switch_mlp") or hasattr(b, "experts")]
    return [f"model.layers.{i}.{_attr(family)}" for i in moe]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_moe_block_is_patched_and_runs_the_kernel_once_per_forward(family, monkeypatch):
    model = build(family)
    calls = []

    def spy(gates, **kw):
        calls.append((gates.shape, kw))
        return reference(gates, **kw)

    # the spy is the kernel's reference: what its prepared launch runs on the CPU, every call
    monkeypatch.setattr(pattern_module, "softmax_router", dataclasses.replace(softmax_router, reference=spy))
    prompt = mx.random.randint(1, 512, (2, 7), key=mx.random.key(3))
    stock = forward(model, prompt, 2, True)
    result = zmlx.patch(model, patterns=["softmax_router"])
    try:
        patched = forward(model, prompt, 2, True)
    finally:
        zmlx.unpatch(model)
    paths = _moe_paths(model, family)
    assert (
        result.patterns["softmax_router"].patched == paths and not result.patterns["softmax_router"].skipped
    )
    assert len(calls) == 3 * len(paths)  # the prompt and two decode steps
    first = family == "qwen3_moe"
    want = dict(top_k=TOP_K[family], softmax_first=first)
    want.update({"norm_topk_prob": True} if first else {"topk_last": True} if family == "gpt_oss" else {})
    assert calls[0] == ((2, 7, GATES[family]), want)
    assert calls[-1][0] == (2, 1, GATES[family])
    for s, p in zip(stock, patched, strict=True):
        assert mx.array_equal(s, p).item()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # Mixtral's top-2: a sum of two, either order
def test_the_order_of_the_k_reaches_the_weighted_sum(family, monkeypatch):
    """The pattern adds the experts' outputs in the order the router returns them (mlx-lm's
    sum over the k): a router returning the same experts and scores reversed changes the
    logits of the float32 model (float32 sums in another order), so the kernel must return
    stock's order (the GPU's sort), as the kernel tests check."""
    model = build(family, "float32")

    def reversed_router(gates, **kw):
        inds, scores = reference(gates, **kw)
        return inds[..., ::-1], scores[..., ::-1]

    prompt = mx.random.randint(1, 512, (2, 7), key=mx.random.key(4))
    stock = forward(model, prompt, 2, True)
    monkeypatch.setattr(
        pattern_module, "softmax_router", dataclasses.replace(softmax_router, reference=reversed_router)
    )
    zmlx.patch(model, patterns=["softmax_router"])
    try:
        patched = forward(model, prompt, 2, True)
    finally:
        zmlx.unpatch(model)
    assert not all(mx.array_equal(s, p).item() for s, p in zip(stock, patched))


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_the_block_class(family):
    model = build(family)
    block = _blocks(model, family)[-1][1]
    cls = type(block)
    zmlx.patch(model, patterns=["softmax_router", "moe_mlp"])
    try:
        assert type(block) is not cls and type(block).__zmlx_original__ is cls
    finally:
        zmlx.unpatch(model)
    assert type(block) is cls


def test_check_says_why_it_skips_a_block():
    check = PATTERNS["softmax_router"].check
    qwen = _blocks(build("qwen3_moe"), "qwen3_moe")[1][1]
    mixtral = _blocks(build("mixtral"), "mixtral")[0][1]
    assert check(qwen, PARAMS["qwen3_moe"]) is None and check(mixtral, PARAMS["mixtral"]) is None
    assert "names no routing" in check(qwen, {})
    assert check(mixtral, PARAMS["qwen3_moe"]) == (
        "MixtralSparseMoeBlock has no top_k, norm_topk_prob: not mlx-lm's sparse MoE block"
    )
    oss = _blocks(build("gpt_oss"), "gpt_oss")[0][1]
    assert check(oss, PARAMS["gpt_oss"]) is None
    # gpt-oss's block read as Mixtral's (wrong family data) is refused, not run in the wrong order
    assert check(oss, PARAMS["mixtral"]) == "MLPBlock has no gate, switch_mlp: not mlx-lm's sparse MoE block"
    assert check(qwen, {"softmax_first": True, "topk_last": False}) == (
        "no mlx-lm block routes with softmax_first=True, topk_last=False"
    )
    router, bias = oss.router, oss.router.bias
    try:  # the router's bias is part of gpt-oss's block (mlx-lm's Linear keeps it)
        del router["bias"]
        assert check(oss, PARAMS["gpt_oss"]) == "router is a QuantizedLinear without a bias or weights"
    finally:
        router.bias = bias
    f32 = _blocks(build("qwen3_moe", "float32"), "qwen3_moe")[1][1]
    assert check(f32, PARAMS["qwen3_moe"]) is None
    top_k = f32.top_k
    try:
        f32.top_k = 17
        assert "top-17" in check(f32, PARAMS["qwen3_moe"])
    finally:
        f32.top_k = top_k


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("patterns", [["softmax_router"], ["softmax_router", "moe_mlp"]])
def test_patched_model_is_bitwise_stock_on_cuda(family, patterns):
    """The kernel inside the tiny bf16 4-bit models: logits bitwise stock for prompts and
    decode steps, batch 1 and 2 (the kernel's path, not its reference)."""
    model = build(family)
    assert softmax_router.plan("cuda").path == "kernel", softmax_router.plan("cuda").reason
    for batch in (1, 2):
        prompt = mx.random.randint(1, 512, (batch, 7), key=mx.random.key(batch))
        stock = forward(model, prompt, 4, True)
        result = zmlx.patch(model, patterns=patterns)
        try:
            patched = forward(model, prompt, 4, True)
        finally:
            zmlx.unpatch(model)
        report = result.patterns["softmax_router"]
        assert report.path == "kernel" and report.fidelity == "exact" and report.patched
        for s, p in zip(stock, patched, strict=True):
            assert mx.array_equal(s, p).item(), (family, patterns, batch)
