"""A patched model pickles (and deep-copies) and loads patched the same way; unpatch works on the copy."""

import copy
import pickle
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import glm4_moe_lite

import zmlx
from zmlx import synth
from zmlx.config import PatchConfig
from zmlx.kernels import moe_combine as combine_kernel
from zmlx.patch.patterns import moe_combine as combine_pattern

PATTERNS = ["moe_router", "moe_combine", "residual_norm", "glm47_rope", "moe_mlp", "swiglu_mlp"]
PROMPT = mx.array([[3, 14, 15, 92, 65]])


@pytest.fixture(autouse=True)
def _on_the_cpu():
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


@pytest.fixture
def model():
    m, _ = synth.build("synth:glm4_moe_lite/tiny/affine4")
    return m


def _classes(model):
    return {path: type(m) for path, m in model.named_modules()}


def _same_logits(a, b):
    return len(a) == len(b) and all(mx.array_equal(x, y).item() for x, y in zip(a, b))


def _same_weights(a, b):
    fa, fb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    return fa.keys() == fb.keys() and all(mx.array_equal(fa[k], fb[k]).item() for k in fa)


def _off_combine(monkeypatch):
    """moe_combine's replacement computes something stock does not: a model that runs the
    patch shows it in its logits (on the CPU the exact patterns are otherwise bitwise stock)."""
    ref = combine_kernel.reference
    monkeypatch.setattr(combine_pattern, "moe_combine", lambda y, s, sh=None: ref(y, s * (1 + 2**-6), sh))


def test_a_stock_model_pickles_as_before(model, decode_steps):
    loaded = pickle.loads(pickle.dumps(model))
    assert _classes(loaded) == _classes(model)
    assert not zmlx.is_patched(loaded) and "_zmlx_state" not in vars(loaded)
    assert _same_logits(decode_steps(loaded, PROMPT, 3), decode_steps(model, PROMPT, 3))


@pytest.mark.parametrize("patterns", [None, PATTERNS])
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_a_patched_model_loads_patched(model, decode_steps, monkeypatch, patterns, protocol):
    stock = decode_steps(model, PROMPT, 3)
    result = zmlx.patch(model, patterns=patterns)
    assert result.patched_modules > 0
    loaded = pickle.loads(pickle.dumps(model, protocol=protocol))
    # the same patched classes (so the same replacement functions), the same report, weights
    assert _classes(loaded) == _classes(model)
    assert zmlx.is_patched(loaded) and zmlx.patch_result(loaded).to_dict() == result.to_dict()
    assert _same_weights(loaded, model)
    assert _same_logits(decode_steps(loaded, PROMPT, 3), decode_steps(model, PROMPT, 3))
    if "moe_combine" in result.patterns and result.patterns["moe_combine"].patched:
        _off_combine(monkeypatch)  # the loaded model runs the patch's code, not stock's
        off = decode_steps(loaded, PROMPT, 3)
        assert _same_logits(off, decode_steps(model, PROMPT, 3)) and not _same_logits(off, stock)
        monkeypatch.undo()
    # unpatch on the copy restores mlx-lm's classes there and leaves the original patched
    zmlx.unpatch(loaded)
    assert not zmlx.is_patched(loaded) and "_zmlx_state" not in vars(loaded)
    assert all(
        t.__module__.startswith("mlx_lm.") or t.__module__.startswith("mlx.")
        for t in _classes(loaded).values()
    )
    assert _same_logits(decode_steps(loaded, PROMPT, 3), stock)
    assert zmlx.is_patched(model) and _classes(model) != _classes(loaded)


def test_options_travel_with_the_pickle(model):
    """A pattern made with a PatchConfig option loads with that option (the same class)."""
    overlap = PatchConfig.from_env({"ZMLX_MOE_SHARED_EXPERTS_OVERLAP": "1"})
    zmlx.patch(model, patterns=["moe_combine"], config=overlap)
    other, _ = synth.build("synth:glm4_moe_lite/tiny/affine4")
    zmlx.patch(other, patterns=["moe_combine"])
    moe, plain = model.model.layers[1].mlp, other.model.layers[1].mlp
    assert type(moe) is not type(plain)  # two option values, two patched classes
    loaded = pickle.loads(pickle.dumps(model))
    assert type(loaded.model.layers[1].mlp) is type(moe)


def test_a_patched_model_deep_copies_patched(model, decode_steps):
    zmlx.patch(model, patterns=PATTERNS)
    twin = copy.deepcopy(model)
    assert _classes(twin) == _classes(model) and zmlx.is_patched(twin)
    assert _same_logits(decode_steps(twin, PROMPT, 2), decode_steps(model, PROMPT, 2))
    zmlx.unpatch(twin)
    assert type(twin.model.layers[1].mlp) is glm4_moe_lite.Glm4MoeLiteMoE
    assert zmlx.is_patched(model) and type(model.model.layers[1].mlp) is not glm4_moe_lite.Glm4MoeLiteMoE


def test_a_pattern_this_zmlx_cannot_make_loads_stock_with_a_warning(model, decode_steps, monkeypatch):
    from zmlx.patch import core

    stock = decode_steps(model, PROMPT, 2)
    zmlx.patch(model, patterns=["moe_combine"])
    data = pickle.dumps(model)
    monkeypatch.delitem(core.PATTERNS, "moe_combine")  # e.g. loaded by a zmlx without it
    with pytest.warns(zmlx.ZmlxWarning, match="loads as the stock module"):
        loaded = pickle.loads(data)
    assert type(loaded.model.layers[1].mlp) is glm4_moe_lite.Glm4MoeLiteMoE
    assert _same_logits(decode_steps(loaded, PROMPT, 2), stock)


@pytest.mark.slow
def test_a_patched_model_loads_patched_in_a_fresh_process(model, decode_steps, tmp_path):
    zmlx.patch(model, patterns=PATTERNS)
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(model))
    code = (
        "import pickle, sys, mlx.core as mx, zmlx\n"
        "from zmlx.fidelity import greedy_logits\n"
        "mx.set_default_device(mx.cpu)\n"
        "m = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "assert zmlx.is_patched(m), 'not patched'\n"
        "print(type(m.model.layers[1].mlp).__module__)\n"
        "mx.save(sys.argv[2], mx.concatenate(greedy_logits(m, mx.array([[3, 14, 15, 92, 65]]), 2), axis=1))\n"
    )
    out = tmp_path / "logits.npy"
    p = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "model.pkl"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "zmlx.patch.core"
    assert mx.array_equal(mx.load(str(out)), mx.concatenate(decode_steps(model, PROMPT, 2), axis=1)).item()
