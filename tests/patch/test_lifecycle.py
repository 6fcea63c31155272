"""patch / unpatch: instances only, exact restore, selection, reports."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import glm4_moe_lite, llama

import zmlx
from zmlx import backend, synth
from zmlx.config import ConfigError, PatchConfig


@pytest.fixture(autouse=True)
def _on_the_cpu():
    """Selection and lifecycle, not kernels: the same answers on every machine (on a GPU
    the default preset and each pattern's path differ; tests/patch/test_exactness.py and
    the kernel tests cover those)."""
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


def _snapshot(model):
    """Every module's identity, class and attribute names; every parameter's identity."""
    mods = {p: (id(m), type(m), sorted(vars(m)), sorted(m.keys())) for p, m in model.named_modules()}
    params = {k: id(v) for k, v in tree_flatten(model.parameters())}
    return mods, params, sorted(vars(model))


def _moe_layers(model):
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, glm4_moe_lite.Glm4MoeLiteMoE)]


@pytest.fixture
def model():
    m, _ = synth.build("synth:glm4_moe_lite/tiny/affine4")
    return m


def test_unpatch_restores_identity(model):
    before = _snapshot(model)
    zmlx.patch(model)
    assert all(type(m) is not glm4_moe_lite.Glm4MoeLiteMoE for m in _moe_layers(model))
    assert zmlx.unpatch(model) is model
    assert _snapshot(model) == before
    for moe in _moe_layers(model):
        assert type(moe) is glm4_moe_lite.Glm4MoeLiteMoE
        assert type(moe.gate) is glm4_moe_lite.MoEGate


def test_patch_never_touches_mlx_lm_classes(model):
    before = {k: v for k, v in vars(glm4_moe_lite.MoEGate).items()}
    before_moe = dict(vars(glm4_moe_lite.Glm4MoeLiteMoE))
    zmlx.patch(model)
    assert dict(vars(glm4_moe_lite.MoEGate)) == before
    assert dict(vars(glm4_moe_lite.Glm4MoeLiteMoE)) == before_moe
    # mlx-lm's own isinstance checks still hold on patched instances.
    assert all(isinstance(m, glm4_moe_lite.Glm4MoeLiteMoE) for m in _moe_layers(model))


def test_patching_twice_equals_patching_once(model):
    zmlx.patch(model)
    once = _snapshot(model)
    zmlx.patch(model)
    assert _snapshot(model) == once
    zmlx.unpatch(model)
    assert all(type(m) is glm4_moe_lite.Glm4MoeLiteMoE for m in _moe_layers(model))
    assert not zmlx.is_patched(model)


def test_unpatch_of_unpatched_model_is_a_no_op(model):
    before = _snapshot(model)
    zmlx.unpatch(model)
    assert _snapshot(model) == before


def test_second_model_is_unaffected(model):
    other, _ = synth.build("synth:glm4_moe_lite/tiny/affine4@1")
    before = _snapshot(other)
    zmlx.patch(model)
    assert _snapshot(other) == before
    assert all(type(m) is glm4_moe_lite.Glm4MoeLiteMoE for m in _moe_layers(other))


def test_result_is_returned_and_attached(model):
    result = zmlx.patch(model)
    assert zmlx.patch_result(model) is result is model.zmlx_patch_result
    assert result.family == "glm4_moe_lite"
    assert result.backend == backend.current()
    router = result.patterns["moe_router"]
    assert router.patched == [f"model.layers.{i}.mlp.gate" for i in (1, 2, 3)]
    assert router.path == "reference" and router.fallbacks  # the reason is recorded
    assert "moe_combine" in str(result)
    assert "residual_norm" not in result.patterns  # exact, but measured slower: opt-in
    assert result.to_dict()["patched_modules"] == 6


def test_unknown_pattern_name_lists_valid_ones(model):
    valid = "compiled_decode, downproj_combine, glm47_rope, gqa_prologue, mla_attention, mla_block"
    valid += ", mla_kv_quant, mla_prologue, moe_block"
    valid += ", moe_combine, moe_mlp, moe_router"
    valid += ", residual_norm, softmax_router"
    with pytest.raises(ConfigError, match=f"nope.*valid: {valid}"):
        zmlx.patch(model, patterns=["nope"])
    with pytest.raises(ConfigError, match="exclude"):
        zmlx.patch(model, exclude=["nope"])
    assert not zmlx.is_patched(model)


def test_explicit_selection_and_exclude(model):
    result = zmlx.patch(model, patterns=["moe_router"])
    assert list(result.patterns) == ["moe_router"]
    assert type(_moe_layers(model)[0]) is glm4_moe_lite.Glm4MoeLiteMoE
    assert result.not_selected == {
        "downproj_combine": "not in the requested patterns",
        "moe_combine": "not in the requested patterns",
        "residual_norm": "not in the requested patterns",
        "moe_mlp": "not in the requested patterns",
        "swiglu_mlp": "not in the requested patterns",
        "glm47_rope": "not in the requested patterns",
        "mla_attention": "not in the requested patterns",
        "moe_block": "not in the requested patterns",
        "mla_block": "not in the requested patterns",
        "mla_prologue": "not in the requested patterns",
        "mla_kv_quant": "not in the requested patterns",
        "compiled_decode": "not in the requested patterns",
    }
    result = zmlx.patch(model, exclude=["moe_router"])
    assert list(result.patterns) == ["moe_combine"]
    assert result.not_selected == {
        "moe_router": "excluded",
        "downproj_combine": "not in the default preset on cpu",
        "residual_norm": "not in the default preset on cpu",
        "moe_mlp": "not in the default preset on cpu",
        "swiglu_mlp": "not in the default preset on cpu",
        "glm47_rope": "not in the default preset on cpu",
        "mla_attention": "not in the default preset on cpu",
        "moe_block": "not in the default preset on cpu",
        "mla_block": "not in the default preset on cpu",
        "mla_prologue": "not in the default preset on cpu",
        "mla_kv_quant": "not in the default preset on cpu",
        "compiled_decode": "not in the default preset on cpu",
    }


def test_the_default_preset_is_chosen_per_backend():
    from zmlx.families import FAMILIES
    from zmlx.patch import select_patterns

    fam = FAMILIES["glm4_moe_lite"]
    for b in ("cpu", "metal"):
        chosen, why_not = select_patterns("glm4_moe_lite", None, None, PatchConfig(), b)
        assert chosen == ["moe_router", "moe_combine"]
        assert why_not["moe_mlp"] == f"not in the default preset on {b}"
    chosen, why_not = select_patterns("glm4_moe_lite", None, None, PatchConfig(), "cuda")
    assert (
        set(chosen)
        == set(fam.preset_on("cuda"))
        == {"moe_router", "moe_mlp", "downproj_combine", "glm47_rope", "moe_block", "mla_prologue"}
    )
    assert why_not["moe_combine"] == "not in the default preset on cuda"
    # flags still add and remove on top of the backend's preset
    cfg = PatchConfig.from_env({"ZMLX_MOE_MLP": "0", "ZMLX_SWIGLU_MLP": "1"})
    chosen, why_not = select_patterns("glm4_moe_lite", None, None, cfg, "cuda")
    assert set(chosen) == {
        *("moe_router", "downproj_combine", "swiglu_mlp", "glm47_rope", "moe_block", "mla_prologue")
    }
    assert why_not["moe_mlp"] == "ZMLX_MOE_MLP=0"


def test_environment_flags_go_through_patch_config(model):
    cfg = PatchConfig.from_env({"ZMLX_MOE_ROUTER": "0"})
    result = zmlx.patch(model, config=cfg)
    assert list(result.patterns) == ["moe_combine"]
    cfg = PatchConfig.from_env({"ZMLX_RESIDUAL_NORM": "1"})
    assert list(zmlx.patch(model, config=cfg).patterns) == ["moe_router", "moe_combine", "residual_norm"]
    assert result.not_selected["moe_router"] == "ZMLX_MOE_ROUTER=0"
    cfg = PatchConfig.from_env({"ZMLX_PATTERNS": "moe_router", "ZMLX_EXCLUDE": ""})
    assert list(zmlx.patch(model, config=cfg).patterns) == ["moe_router"]
    with pytest.raises(ConfigError, match="ZMLX_MOE_ROUTER='maybe'"):
        zmlx.patch(model, config=PatchConfig.from_env({"ZMLX_MOE_ROUTER": "maybe"}))
    with pytest.raises(ConfigError, match="ZMLX_PATTERNS"):
        zmlx.patch(model, config=PatchConfig.from_env({"ZMLX_PATTERNS": "moe_router,bogus"}))


def test_patch_reads_the_environment_by_default(model, monkeypatch):
    monkeypatch.setenv("ZMLX_EXCLUDE", "moe_combine")
    assert list(zmlx.patch(model).patterns) == ["moe_router"]


def test_non_moe_model_is_returned_unchanged():
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=100,
        num_key_value_heads=2,
    )
    dense = llama.Model(args)
    before = _snapshot(dense)
    with pytest.warns(zmlx.ZmlxWarning, match="nothing to patch: model_type 'llama'"):
        result = zmlx.patch(dense)
    assert result.patched_modules == 0 and "glm4_moe_lite" in result.message
    assert _snapshot(dense) == before and not zmlx.is_patched(dense)


def test_not_a_model_is_a_type_error():
    with pytest.raises(TypeError, match="expects an mlx-lm model"):
        zmlx.patch(object())


def test_sharded_moe_is_patched_with_its_all_sum(model):
    """A tensor-parallel MoE (mlx-lm's shard() sets sharding_group) is patched: moe_combine
    all-sums after the combine, where mlx-lm does (run over two processes in
    tests/distributed/test_sharded.py)."""
    moe = _moe_layers(model)[0]
    moe.sharding_group = object()
    combine = zmlx.patch(model).patterns["moe_combine"]
    assert combine.skipped == [] and len(combine.patched) == 3
    zmlx.unpatch(model)
    assert type(moe) is glm4_moe_lite.Glm4MoeLiteMoE


def test_changed_signature_is_skipped_not_patched(model, monkeypatch):
    """A replacement whose signature no longer matches mlx-lm's method is not installed."""
    from zmlx.patch.patterns import moe_router

    def make(renorm_eps=None):
        def __call__(self, x, extra):
            return None

        return __call__

    monkeypatch.setitem(
        zmlx.PATTERNS,
        "moe_router",
        moe_router.PATTERN.__class__(**{**moe_router.PATTERN.__dict__, "make": make}),
    )
    result = zmlx.patch(model, patterns=["moe_router"])
    assert result.patterns["moe_router"].patched == []
    assert "signature changed" in result.patterns["moe_router"].skipped[0][1]
    assert not zmlx.is_patched(model)


def test_patched_model_still_quantizes_and_saves_the_same_tree(model):
    """The parameter tree (names and arrays) is what mlx-lm sees, patched or not."""
    before = dict(tree_flatten(model.parameters()))
    zmlx.patch(model)
    after = dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before)
    assert isinstance(model, nn.Module)
    mx.eval(model(mx.array([[1, 2, 3]])))


def test_shared_expert_overlap_is_read_from_the_environment():
    assert PatchConfig.from_env({}).shared_overlap is False
    assert PatchConfig.from_env({"ZMLX_MOE_SHARED_EXPERTS_OVERLAP": "1"}).shared_overlap is True
    assert (
        PatchConfig.from_env({"ZMLX_MOE_SHARED_EXPERTS_OVERLAP": "1", "ZMLX_MOE_STREAMS": "2"}).shared_overlap
        is True
    )
    assert PatchConfig.from_env({"ZMLX_MOE_STREAMS": "2"}).shared_overlap is False
    for bad, why in (
        ({"ZMLX_MOE_SHARED_EXPERTS_OVERLAP": "1", "ZMLX_MOE_STREAMS": "1"}, "needs"),
        ({"ZMLX_MOE_STREAMS": "3"}, "1 or 2"),
        ({"ZMLX_MOE_STREAMS": "two"}, "whole number"),
        ({"ZMLX_MOE_SHARED_EXPERTS_OVERLAP": "sometimes"}, "use 1"),
    ):
        with pytest.raises(ConfigError, match=why):
            PatchConfig.from_env(bad)
    # neither is a pattern flag
    assert "ZMLX_MOE_STREAMS" not in PatchConfig.from_env({"ZMLX_MOE_STREAMS": "2"}).flags
