"""patch() and select_patterns take the one selection grammar (zmlx.config.parse_selection);
an unknown ZMLX_* variable is warned about once, with the valid names."""

import warnings

import mlx.core as mx
import pytest

import zmlx
from zmlx import synth
from zmlx.config import NOT_FLAGS, ConfigError, PatchConfig, flag_name
from zmlx.patch import core, select_patterns


@pytest.fixture(autouse=True)
def _on_the_cpu():
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


@pytest.fixture(scope="module")
def model():
    return synth.build("synth:glm4_moe_lite/tiny/affine4")[0]


def _applied(result):
    return [n for n, r in result.patterns.items() if r.patched]


def test_a_single_string_is_one_pattern(model):
    result = zmlx.patch(model, patterns="moe_router", config=PatchConfig())
    assert _applied(result) == ["moe_router"]
    assert _applied(zmlx.patch(model, "moe_router,moe_combine", config=PatchConfig())) == [
        "moe_router",
        "moe_combine",
    ]
    assert _applied(zmlx.patch(model, exclude="moe_router", config=PatchConfig())) == ["moe_combine"]
    zmlx.unpatch(model)


def test_none_means_no_patterns_in_every_spelling(model):
    for none in ("none", (), [], ["none"]):
        result = zmlx.patch(model, patterns=none, config=PatchConfig())
        assert result.patterns == {} and not zmlx.is_patched(model), none
    result = zmlx.patch(model, config=PatchConfig.from_env({"ZMLX_PATTERNS": "none"}))
    assert result.patterns == {} and not zmlx.is_patched(model)
    # exclude=none leaves out nothing: the preset
    assert _applied(zmlx.patch(model, exclude="none", config=PatchConfig())) == ["moe_router", "moe_combine"]
    zmlx.unpatch(model)


@pytest.mark.parametrize("empty", ["", ",", "  "])
def test_an_empty_selection_is_refused_not_guessed(model, empty):
    for kwargs in ({"patterns": empty}, {"exclude": empty}):
        with pytest.raises(ConfigError, match="use none for no patterns"):
            zmlx.patch(model, **kwargs, config=PatchConfig())
        assert not zmlx.is_patched(model)


def test_select_patterns_takes_the_same_grammar():
    cfg = PatchConfig()
    assert select_patterns("glm4_moe_lite", "moe_router", None, cfg)[0] == ["moe_router"]
    assert select_patterns("glm4_moe_lite", "none", None, cfg)[0] == []
    assert select_patterns("glm4_moe_lite", None, "moe_router", cfg)[0] == ["moe_combine"]
    with pytest.raises(ConfigError, match="empty pattern list in exclude"):
        select_patterns("glm4_moe_lite", None, ",", cfg)


def test_an_unknown_variable_is_warned_about_once_with_the_valid_names(model, monkeypatch):
    monkeypatch.setattr(core, "_WARNED", set())
    cfg = PatchConfig.from_env({"ZMLX_MOE_ROUTR": "1"})
    with pytest.warns(zmlx.ZmlxWarning, match="ZMLX_MOE_ROUTR is not a zmlx variable") as caught:
        zmlx.patch(model, config=cfg)
    (w,) = caught
    text = str(w.message)
    assert "did you mean ZMLX_MOE_ROUTER?" in text
    for name in zmlx.PATTERNS:
        assert flag_name(name) in text
    assert "ZMLX_PATTERNS" in text and "ZMLX_LEDGER" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        zmlx.patch(model, config=cfg)
    zmlx.unpatch(model)


def test_no_warning_for_the_variables_zmlx_uses(model, monkeypatch):
    monkeypatch.setattr(core, "_WARNED", set())
    env = {flag_name(n): "0" for n in zmlx.PATTERNS} | {n: "" for n in NOT_FLAGS}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zmlx.patch(model, config=PatchConfig.from_env(env))
    zmlx.unpatch(model)


def test_the_preset_variable_is_not_an_unknown_pattern_flag(model, monkeypatch):
    monkeypatch.setattr(core, "_WARNED", set())
    assert "ZMLX_PRESET" in NOT_FLAGS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = zmlx.patch(model, config=PatchConfig.from_env({"ZMLX_PRESET": "fast"}))
    assert result.preset == "fast"
    zmlx.unpatch(model)
