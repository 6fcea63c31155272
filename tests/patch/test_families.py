"""The families of issue 19 in zmlx.families: patch finds their classes (no "nothing to
patch" warning), unpatch restores them exactly, and every pattern that does not apply says
why in the PatchResult. The bitwise checks are in test_family_exactness.py (whose tiny
random models, built from mlx-lm's own classes, these tests share)."""

from __future__ import annotations

import importlib
import warnings

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwiGLU
from test_family_exactness import APPLIES, FAMILY_NAMES, build

import zmlx
from zmlx.families import FAMILIES, UNSUPPORTED
from zmlx.kernels.core import KernelDef
from zmlx.patch import PATTERNS

_GQA = "GQA attention, not MLA"
_DSA = "DSA indexer (sparse attention over the cache's top-k positions) is not supported"
_SOFTMAX = "softmax router inside the MoE block"
_BLOCK_ROUTES = "the MoE block routes in its own __call__"
_SOFTMAX_GATE = "router is a QuantizedLinear: softmax routing inside the MoE block"
_WINS = "__call__ already replaced by downproj_combine"
_YIELDS = "moe_block is applied and this pattern would bypass it"
_MLA_ONLY = ("glm47_rope", "mla_attention", "mla_block", "mla_prologue", "mla_kv_quant")
_YIELDS_TO_MLA_BLOCK = "mla_block is applied and this pattern would bypass it"
_SIGMOID = {"softmax_router": {"sigmoid MoEGate router (moe_router fuses it)"}}

# family -> pattern -> what its skip reasons say, when every pattern is asked for at once
# (a pattern that patches some modules and skips others is in both APPLIES and here)
SKIPS: dict[str, dict[str, set[str]]] = {
    "deepseek_v3": {
        **_SIGMOID,
        "moe_combine": {_WINS},
        "residual_norm": {_YIELDS},
        "mla_prologue": {_YIELDS_TO_MLA_BLOCK},
        "glm47_rope": {"__call__ already replaced by mla_attention"},
        "mla_kv_quant": {"__call__ already replaced by mla_attention"},
    },
    "kimi_k25": {
        **_SIGMOID,
        "moe_combine": {_WINS},
        "residual_norm": {_YIELDS},
        "mla_prologue": {_YIELDS_TO_MLA_BLOCK},
        "glm47_rope": {"__call__ already replaced by mla_attention"},
        "mla_kv_quant": {"__call__ already replaced by mla_attention"},
    },
    "deepseek_v32": {
        **_SIGMOID,
        "moe_combine": {_WINS},
        "residual_norm": {"the model loop takes the mask from the DSA CacheList"},
        "glm47_rope": {_DSA},
        "mla_attention": {_DSA},
        "mla_block": {_DSA},
        "mla_prologue": {_DSA},
        "compiled_decode": {"layer 0 has a DSA indexer"},
        "mla_kv_quant": {"DSA indexer: the layer's cache is a CacheList"},
    },
    "glm_moe_dsa": {
        **_SIGMOID,
        "moe_combine": {_WINS},
        "residual_norm": {"the model loop takes the mask from the DSA CacheList"},
        "glm47_rope": {_DSA},
        "mla_attention": {_DSA},
        "mla_block": {_DSA},
        "mla_prologue": {_DSA},
        "compiled_decode": {"layer 0 has a DSA indexer"},
        "mla_kv_quant": {"DSA indexer: the layer's cache is a CacheList"},
    },
    "glm4_moe": {
        **_SIGMOID,
        "moe_combine": {_WINS},
        "residual_norm": {"the model loop passes a 'causal' mask"},
        **{p: {_GQA} for p in _MLA_ONLY},
    },
    "qwen3_moe": {
        "moe_router": {_SOFTMAX},
        "moe_combine": {_BLOCK_ROUTES},
        "residual_norm": {"the model loop passes a 'causal' mask"},
        **{p: {_GQA} for p in _MLA_ONLY},
    },
    "mixtral": {
        "moe_router": {_SOFTMAX},
        "moe_combine": {_BLOCK_ROUTES},
        "swiglu_mlp": {"no dense MLP"},
        "residual_norm": {"the decoder layer calls block_sparse_moe, not mlp"},
        **{p: {_GQA} for p in _MLA_ONLY},
    },
    "gpt_oss": {
        "moe_router": {_SOFTMAX},
        "moe_combine": {_BLOCK_ROUTES},
        "downproj_combine": {"the experts have biases and SwigluOAI"},
        "swiglu_mlp": {"no dense MLP"},
        "residual_norm": {"a full or a sliding-window mask by its type"},
        **{p: {"GQA attention with sinks and sliding windows, not MLA"} for p in _MLA_ONLY},
        "compiled_decode": {"sliding-window layers (RotatingKVCache)"},
    },
}
# gqa_prologue takes the GQA families' attention; the MLA families say why not
for _family in ("deepseek_v3", "kimi_k25", "deepseek_v32", "glm_moe_dsa"):
    SKIPS[_family]["gqa_prologue"] = {"MLA attention (mla_prologue fuses"}


def _classes(model):
    return [(path, type(m), id(m)) for path, m in model.named_modules()]


def _arrays(model):
    return [(k, id(v)) for k, v in tree_flatten(model.parameters())]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_patch_finds_the_family_without_warning(family):
    model = build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error", zmlx.ZmlxWarning)
        result = zmlx.patch(model, patterns=sorted(PATTERNS))
    zmlx.unpatch(model)
    assert result.family == family and "nothing to patch" not in result.message
    # every pattern that applies, less those that another one wins over
    lose = {"moe_combine", "residual_norm"} | (
        {"glm47_rope", "mla_prologue"} if "mla_attention" in APPLIES[family] else set()
    )
    assert {n for n, r in result.patterns.items() if r.patched} == APPLIES[family] - lose


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("patterns", [None, "cuda", "all"])
def test_patch_then_unpatch_leaves_the_same_objects(family, patterns):
    model = build(family)
    chosen = {"cuda": FAMILIES[family].preset_on("cuda"), "all": sorted(PATTERNS)}.get(patterns)
    classes, arrays = _classes(model), _arrays(model)
    result = zmlx.patch(model, patterns=chosen)
    swapped = [p for (p, cls, _), (_, now, _) in zip(classes, _classes(model)) if now is not cls]
    assert len(swapped) == len({m for r in result.patterns.values() for m in r.patched})
    for (_, cls, _), (_, now, _) in zip(classes, _classes(model)):
        assert now is cls or (issubclass(now, cls) and now.__zmlx_original__ is cls)
    zmlx.unpatch(model)
    assert _classes(model) == classes and _arrays(model) == arrays
    assert not hasattr(model, "zmlx_patch_result")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_pattern_that_does_not_apply_says_why(family):
    model = build(family)
    result = zmlx.patch(model, patterns=sorted(PATTERNS))
    zmlx.unpatch(model)
    for name, report in result.patterns.items():
        want = SKIPS[family].get(name, set())
        got = {why for _, why in report.skipped}
        assert len(got) == len(want), (name, got)
        for w in want:
            assert any(w in g for g in got), (name, w, got)
        assert report.patched or report.skipped, f"{name}: neither patched nor skipped"


def test_gpt_oss_is_a_family_whose_default_preset_is_cuda_only():
    """gpt-oss is supported (softmax_router fuses its routing, moe_mlp its biased experts), so
    patch no longer warns "nothing to patch"; its default preset is empty on the CPU and
    Metal (close there) and both patterns on CUDA, where their cuda tests ran bitwise, with
    moe_block (its softmax-routed layers behind moe_block.SOFTMAX_LAYERS)."""
    model = build("gpt_oss")
    with warnings.catch_warnings():
        warnings.simplefilter("error", zmlx.ZmlxWarning)
        result = zmlx.patch(model)
    zmlx.unpatch(model)
    assert result.family == "gpt_oss" and "nothing to patch" not in result.message
    assert "gpt_oss" not in UNSUPPORTED and result.patched_modules == 0
    assert all(FAMILIES["gpt_oss"].preset_on(b) == () for b in ("cpu", "metal"))
    assert FAMILIES["gpt_oss"].preset_on("cuda") == ("softmax_router", "moe_mlp", "moe_block", "gqa_prologue")
    routing = {"softmax_first": False, "topk_last": True}
    assert FAMILIES["gpt_oss"].targets["softmax_router"].params == routing
    assert FAMILIES["gpt_oss"].targets["moe_block"].params == routing


def test_gpt_oss_modules_are_taken_or_refused_by_the_checks_with_reasons():
    """moe_mlp takes gpt-oss's experts (its kernel adds the gate and up biases and applies
    SwigluOAI); moe_block refuses them (its kernels take bias-free SwiGLU experts)."""
    model = build.__wrapped__("gpt_oss", "float32")  # a model of its own: this test edits it
    layer = model.model.layers[0]
    experts = layer.mlp.experts
    assert PATTERNS["moe_mlp"].check(experts, {}) is None
    biases = "experts have biases (gate_proj, up_proj, down_proj); the expert kernels take bias-free"
    assert PATTERNS["moe_block"].check(layer, {}) == f"{biases} projections"
    # a bias on gate_proj alone; then none: the clamped SwiGLU is moe_block's reason
    del experts.up_proj["bias"]
    assert PATTERNS["moe_mlp"].check(experts, {}) == "a bias on one of gate_proj and up_proj only"
    for proj in ("gate_proj", "down_proj"):
        del getattr(experts, proj)["bias"]
    assert PATTERNS["moe_mlp"].check(experts, {}) is None
    assert PATTERNS["moe_block"].check(layer, {}) == "activation SwigluOAI (only SwiGLU is fused)"
    experts.activation = SwiGLU()
    assert PATTERNS["moe_mlp"].check(experts, {}) is None
    assert PATTERNS["moe_block"].check(layer, {}).startswith("router is a Linear: softmax routing inside")


def test_moe_block_refuses_a_softmax_router_instead_of_failing():
    """mlx-lm's Qwen3-MoE block has an nn.Linear gate with no config: the check says so."""
    layer = build("qwen3_moe").model.layers[1]
    why = PATTERNS["moe_block"].check(layer, {})
    assert why is not None and why.startswith("router is a QuantizedLinear: softmax routing")
    assert PATTERNS["moe_router"].check(layer.mlp.gate, {}) == why


def test_group_limited_routing_is_taken_by_both_router_patterns():
    """DeepSeek-V3's grouping is fused; a grouping the router kernels do not take is refused
    by both with the same reason (3 groups of 16 experts do not divide)."""
    model = build("deepseek_v3")
    layer = model.model.layers[1]
    assert (layer.mlp.gate.n_group, layer.mlp.gate.topk_group) == (4, 2)
    assert PATTERNS["moe_router"].check(layer.mlp.gate, {}) is None
    assert PATTERNS["moe_block"].check(layer, {}) is None
    gate = layer.mlp.gate
    try:
        gate.n_group = 3
        why = "16 experts in 3 groups (the kernel takes <= 32 groups of >= 2 experts)"
        assert PATTERNS["moe_router"].check(gate, {}) == why
        assert PATTERNS["moe_block"].check(layer, {}) == why
        gate.n_group, gate.topk_group = 4, 5
        assert PATTERNS["moe_router"].check(gate, {}) == "topk_group=5 of 4 groups"
    finally:
        gate.n_group, gate.topk_group = 4, 2


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"glm4_moe_lite"}))
def test_family_data_names_real_classes_and_exact_presets(family):
    fam = FAMILIES[family]
    for name, target in fam.targets.items():
        assert name in PATTERNS and isinstance(fam.target_class(name), type), name
    assert not set(fam.skips) & set(fam.targets)
    assert set(fam.targets) | set(fam.skips) == set(PATTERNS)  # every pattern: a target or a reason
    for backend in ("cpu", "metal", "cuda"):
        for name in fam.preset_on(backend):
            pattern = PATTERNS[name]
            kernels: tuple[KernelDef, ...] = pattern.kernels
            assert name in fam.targets
            exact = all(k.fidelity_on(backend) == "exact" for k in kernels) if kernels else False
            assert exact, f"{family}: {name} is not exact on {backend}"
        assert not fam.fast_added(backend)  # no ledger line for these families yet


def test_router_epsilon_per_family_follows_mlx_lm():
    """glm4_moe_lite adds 1e-20 to the renorm denominator; DeepSeek-V3/V3.2 (and Kimi, GLM-5
    built from them) and glm4_moe do not: read from mlx-lm's source."""
    import inspect

    for family, fam in FAMILIES.items():
        if "moe_router" not in fam.targets:
            continue
        source = inspect.getsource(importlib.import_module(fam.module).group_expert_select)
        eps = fam.targets["moe_router"].params.get("renorm_eps")
        assert ("1e-20" in source) == (eps == 1e-20), family
        assert (
            fam.targets.get("moe_block") is None or fam.targets["moe_block"].params.get("renorm_eps") == eps
        )


def test_kimi_is_patched_through_its_own_model_class():
    from mlx_lm.models import kimi_k25

    model = build("kimi_k25")
    assert FAMILIES["kimi_k25"].target_class("compiled_decode") is kimi_k25.Model
    result = zmlx.patch(model, patterns=["compiled_decode"])
    try:
        assert result.patterns["compiled_decode"].patched == ["<model>"]
        assert len(model.make_cache()) == len(model.layers)
    finally:
        zmlx.unpatch(model)
    assert mx.array_equal(model(mx.array([[1, 2, 3]])), model(mx.array([[1, 2, 3]]))).item()
