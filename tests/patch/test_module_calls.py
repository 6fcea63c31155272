"""The module patterns' kernel calls prepared once per module and shapes
(zmlx.patch.module_calls): the same values as a plain kernel call (on the CPU the reference,
mlx-lm's ops: bitwise stock), prepared again for new weights, gone with the module."""

import gc

import mlx.core as mx
import pytest
from block_helpers import same
from test_family_exactness import build

import zmlx
from zmlx.fidelity import greedy_logits
from zmlx.kernels.softmax_router import softmax_router
from zmlx.patch import module_calls

PROMPT = mx.array([[3, 14, 15, 92, 65]])
MODULES = ["softmax_router", "downproj_combine", "moe_mlp"]


@pytest.fixture
def counted(monkeypatch):
    """How many launches module_calls prepared (none prepared before: the models are shared)."""
    module_calls._CALLS.clear()
    calls = [0]
    inner = module_calls.prepare

    def counting(*a, **k):
        calls[0] += 1
        return inner(*a, **k)

    monkeypatch.setattr(module_calls, "prepare", counting)
    yield calls
    module_calls._CALLS.clear()


def _names(module) -> set[str]:
    return {key[0].name for key in module_calls.prepared(module)}


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_each_call_is_prepared_once_and_the_values_are_stock(family, counted):
    model = build(family)
    stock = greedy_logits(model, PROMPT, 5)
    moe_layers = [
        layer.mlp for layer in model.model.layers if "router" in layer.mlp or "switch_mlp" in layer.mlp
    ]
    block = moe_layers[0]
    experts = block["experts"] if family == "gpt_oss" else block["switch_mlp"]
    zmlx.patch(model, patterns=MODULES)
    try:
        patched = greedy_logits(model, PROMPT, 5)
        names = _names(block), _names(experts)  # before unpatch, which lets them go
    finally:
        zmlx.unpatch(model)
    assert same(stock, patched)
    # one launch a kernel and module: the decode steps' (one shape); prompts take mlx-lm's path
    # in moe_mlp and downproj_combine, the routing's prompt shape is prepared once more
    per_layer = {"qwen3_moe": 4, "gpt_oss": 3}[family]
    assert counted[0] == per_layer * len(moe_layers)
    want = {"softmax_router"} | ({"downproj_combine"} if family == "qwen3_moe" else set())
    assert names == (want, {"moe_mlp"})


def test_new_weights_are_prepared_again_and_used(counted):
    model = build("qwen3_moe", quant="float32")
    down = model.model.layers[1].mlp.switch_mlp.down_proj
    original = down["weight"]
    zmlx.patch(model, patterns=MODULES)
    try:
        greedy_logits(model, PROMPT, 2)
        before = counted[0]
        down["weight"] = original * 1.5
        patched = greedy_logits(model, PROMPT, 2)
    finally:
        zmlx.unpatch(model)
    stock = greedy_logits(model, PROMPT, 2)
    down["weight"] = original
    assert same(stock, patched)
    assert counted[0] > before  # the layer's downproj_combine was prepared again


def test_a_call_computes_what_the_kernel_call_computes():
    """Straight through module_calls.call and as a plain kernel call, fresh arrays each time."""

    class Owner:
        pass

    owner = Owner()
    (gates,), kw = softmax_router.example()
    for seed in range(3):
        g = (gates.astype(mx.float32) * (1 + seed / 4)).astype(gates.dtype)
        got = module_calls.call(owner, softmax_router, (g,), kw, (0,))
        want = softmax_router(g, **kw)
        assert all(mx.array_equal(a, b).item() for a, b in zip(got, want))
    assert len(module_calls.prepared(owner)) == 1


def test_the_prepared_calls_die_with_their_module():
    class Owner:
        pass

    owner = Owner()
    (gates,), kw = softmax_router.example()
    module_calls.call(owner, softmax_router, (gates,), kw, (0,))
    key = id(owner)
    assert key in module_calls._CALLS
    del owner
    gc.collect()
    assert key not in module_calls._CALLS


def test_unpatch_drops_what_was_prepared_for_the_model():
    """The prepared calls and blocks hold the model's weights: unpatch lets them go, so that
    weights loaded into the model afterwards do not leave the old ones alive."""
    from zmlx.patch.patterns import moe_block

    model = build("qwen3_moe")  # moe_block takes its dense layer, the module patterns the rest
    zmlx.patch(model, patterns=[*MODULES, "moe_block"])
    try:
        greedy_logits(model, PROMPT, 3)
        ids = {id(m) for _, m in model.named_modules()}
        assert ids & set(module_calls._CALLS) and ids & set(moe_block._BLOCKS)
    finally:
        zmlx.unpatch(model)
    assert not ids & set(module_calls._CALLS) and not ids & set(moe_block._BLOCKS)
