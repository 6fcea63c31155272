"""mlx-lm's own model tests (tests/test_models.py of the installed mlx-lm's sdist, from the
package index) end exactly as they end stock with every model patched first: with each
family's default preset and with every pattern (zmlx.bench.mlx_lm_tests). The record of the
patched runs shows the patterns were applied, so the comparison cannot pass by patching
nothing."""

import pytest

from zmlx.bench import mlx_lm_tests
from zmlx.bench.mlx_lm_plugin import model_modules
from zmlx.families import FAMILIES
from zmlx.patch.patterns import PATTERNS


@pytest.fixture(scope="module")
def test_models():
    try:
        return mlx_lm_tests.fetch() / "test_models.py"
    except mlx_lm_tests.FetchError as e:  # --require-toolchains (CI) fails this skip
        pytest.skip(f"mlx-lm's sdist from the package index: {e}")


@pytest.fixture(scope="module")
def stock(test_models):
    run = mlx_lm_tests.run(test_models)
    assert run.counts().get("passed", 0) > 50, run.counts()  # the file really ran
    return run


@pytest.mark.parametrize("selection", ["default", "all"])
def test_mlx_lm_model_tests_end_as_stock_with_every_model_patched(test_models, stock, selection):
    patterns = ",".join(PATTERNS) if selection == "all" else "default"
    run = mlx_lm_tests.run(test_models, patterns)
    assert mlx_lm_tests.compare(stock, run) == []
    applied = {p["model_type"]: set(p["applied"]) for p in run.patched if p["applied"]}
    # the families mlx-lm's file builds, each patched with something (CPU presets: the
    # sigmoid-router families have one; every pattern reaches every family there)
    want = {"glm4_moe_lite", "deepseek_v3", "glm4_moe"}
    if selection == "all":
        want |= {"qwen3_moe", "mixtral", "gpt_oss"}
    assert want <= set(applied), applied
    if selection == "all":
        assert {"moe_block", "mla_block", "compiled_decode"} <= applied["glm4_moe_lite"]


def test_compare_names_each_test_that_ended_otherwise():
    stock = mlx_lm_tests.Run({"a::x": "passed", "a::y": "failed", "a::z": "skipped"})
    patched = mlx_lm_tests.Run({"a::x": "failed", "a::y": "failed", "a::w": "passed"})
    assert mlx_lm_tests.compare(stock, patched) == [
        "a::w: stock absent, patched passed",
        "a::x: stock passed, patched failed",
        "a::z: stock skipped, patched absent",
    ]


def test_the_plugin_wraps_every_family_model_module():
    modules = model_modules()
    assert {f.module for f in FAMILIES.values()} <= set(modules)
    assert "mlx_lm.models.kimi_k25" in modules  # Kimi's Model lives in its own module
