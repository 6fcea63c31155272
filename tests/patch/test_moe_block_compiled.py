"""moe_block and gqa_prologue with `COMPILED` on: each prepared block called through
mx.compile (traced once for its fixed shapes, then replayed), the same launches. On the CPU
(their references) and, in the `cuda` tests, on the GPU (the kernels), the patched model
stays mlx-lm's bitwise, on every family whose layers moe_block takes, and the family's CUDA
preset with it."""

import mlx.core as mx
import pytest
from block_helpers import same
from test_family_exactness import _check_bitwise, build

import zmlx
from zmlx import synth
from zmlx.families import FAMILIES
from zmlx.fidelity import greedy_logits
from zmlx.patch.patterns import compiled_decode, gqa_prologue, mla_prologue, moe_block

pytestmark = pytest.mark.usefixtures("blocks_on_the_cpu")

FAMILIES_WITH_BLOCKS = ("glm4_moe_lite", "deepseek_v3", "glm4_moe", "qwen3_moe", "gpt_oss")


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    monkeypatch.setattr(moe_block, "COMPILED", True)
    monkeypatch.setattr(gqa_prologue, "COMPILED", True)
    monkeypatch.setattr(mla_prologue, "COMPILED", True)
    for pattern in (gqa_prologue, mla_prologue):
        pattern._BLOCKS.clear()
    yield
    for pattern in (gqa_prologue, mla_prologue):
        pattern._BLOCKS.clear()


def _model(family: str, cuda_widths: bool = False):
    if family == "glm4_moe_lite":
        return synth.build("synth:glm4_moe_lite/tiny/affine4")[0]
    return build(family, cuda_widths=cuda_widths)


def _compiled_blocks(model) -> int:
    """How many prepared blocks of the model's layers are compiled ones."""
    n = 0
    for layer in model.layers:
        entry = moe_block._BLOCKS.get(id(layer))
        if entry is not None and entry[0]() is layer:
            n += sum(isinstance(b, moe_block._Compiled) for _, b in entry[1].values())
    return n


@pytest.mark.parametrize("family", FAMILIES_WITH_BLOCKS)
def test_compiled_blocks_are_mlx_lm_bitwise_on_the_cpu(family):
    model = _model(family)
    prompt = mx.random.randint(1, 512, (1, 6), key=mx.random.key(5))
    stock = greedy_logits(model, prompt, 3)
    result = zmlx.patch(model, patterns=["moe_block"])
    try:
        patched = greedy_logits(model, prompt, 3)
        compiled = _compiled_blocks(model)
    finally:
        zmlx.unpatch(model)
    assert result.patterns["moe_block"].skipped == []
    assert compiled == len(result.patterns["moe_block"].patched) > 0  # each layer's one-token block
    assert same(stock, patched)


def test_off_the_blocks_are_not_compiled(monkeypatch):
    monkeypatch.setattr(moe_block, "COMPILED", False)
    model = _model("qwen3_moe")
    zmlx.patch(model, patterns=["moe_block"])
    try:
        greedy_logits(model, mx.array([[3, 1, 4, 1, 5]]), 2)
        assert _compiled_blocks(model) == 0 and moe_block._BLOCKS
    finally:
        zmlx.unpatch(model)


PROLOGUES = {"gqa_prologue": gqa_prologue, "mla_prologue": mla_prologue}
CASES = [
    ("qwen3_moe", "gqa_prologue"),
    ("glm4_moe", "gqa_prologue"),
    ("gpt_oss", "gqa_prologue"),
    ("glm4_moe_lite", "mla_prologue"),
    ("deepseek_v3", "mla_prologue"),
]


@pytest.mark.parametrize("family,prologue", CASES)
@pytest.mark.parametrize("with_compiled_decode", [False, True])
def test_compiled_prologues_are_mlx_lm_bitwise_on_the_cpu(family, prologue, with_compiled_decode):
    """The prologues' two launches through mx.compile (the position as an array: the row the
    kernel reads, the reference's int32 position), eagerly and inside compiled_decode's step."""
    if with_compiled_decode and family == "gpt_oss":
        pytest.skip("compiled_decode refuses gpt-oss's sliding-window caches")
    model = _model(family)
    prompt = mx.random.randint(1, 512, (1, 6), key=mx.random.key(7))
    stock = greedy_logits(model, prompt, 3)
    patterns = [prologue, "compiled_decode"] if with_compiled_decode else [prologue]
    zmlx.patch(model, patterns=patterns)
    try:
        patched = greedy_logits(model, prompt, 3)
        blocks = [b for e in PROLOGUES[prologue]._BLOCKS.values() for _, b in e[1].values()]
        stats = compiled_decode.stats(model)
    finally:
        zmlx.unpatch(model)
    assert blocks and all(not isinstance(b, str) and b.front.compiled for b in blocks)
    assert stats["compiled_steps"] == (3 if with_compiled_decode else 0)
    assert same(stock, patched)


@pytest.mark.cuda
@pytest.mark.parametrize("family", [f for f in FAMILIES_WITH_BLOCKS if f != "glm4_moe_lite"])
def test_on_the_gpu_compiled_blocks_keep_the_family_preset_bitwise_stock(family):
    """COMPILED's check: each family's CUDA preset, moe_block's blocks compiled, bitwise stock
    (stock repeating itself first), prompts and decode, batch 1 and 2, with and without cache."""
    mx.set_default_device(mx.gpu)
    model = build(family, cuda_widths=True)
    _check_bitwise(model, FAMILIES[family].preset_on("cuda"), stock_twice=True)


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["tiny_f32", "deepseek_v3"])
def test_on_the_gpu_compiled_mla_prologue_and_blocks_are_bitwise_stock(request, which):
    """mla_prologue's compiled launches with moe_block's compiled blocks (GLM-4.7-Flash's
    default preset's two block patterns), greedy logits bitwise stock's on the GPU."""
    mx.set_default_device(mx.gpu)
    model = build(which, cuda_widths=True) if which == "deepseek_v3" else request.getfixturevalue(which)[0]
    prompt = mx.array([[3, 14, 15, 92, 65, 35]])
    stock = greedy_logits(model, prompt, 5)
    zmlx.patch(model, patterns=["mla_prologue", "moe_block"])
    try:
        patched = greedy_logits(model, prompt, 5)
        blocks = [b for e in mla_prologue._BLOCKS.values() for _, b in e[1].values()]
    finally:
        zmlx.unpatch(model)
    assert blocks and all(not isinstance(b, str) and b.front.compiled for b in blocks)
    assert same(stock, patched)
