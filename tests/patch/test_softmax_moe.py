"""The softmax-routed MoE block's shared __call__ (zmlx.patch.softmax_moe): softmax_router's
routing and downproj_combine's combine, each alone or both in one function, bitwise mlx-lm's
block on the CPU (the kernels' references), and downproj_combine's launch taken at decode only,
with the router's scores in the activations' dtype."""

from __future__ import annotations

import dataclasses
import pickle

import mlx.core as mx
import pytest
from test_family_exactness import build, forward

import zmlx
from zmlx.patch.patterns import downproj_combine as combine_module

BLOCK = {"qwen3_moe": "Qwen3MoeSparseMoeBlock", "mixtral": "MixtralSparseMoeBlock"}


def _blocks(model, family):
    return [m for _, m in model.named_modules() if type(m).__name__ == BLOCK[family]]


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = combine_module.downproj_combine

    def recording(h, inds, scores, *rest, **kw):
        calls.append((h.shape, scores.dtype, h.dtype))
        return real(h, inds, scores, *rest, **kw)

    # the pattern calls a KernelDef (zmlx.patch.module_calls): the spy is the kernel's
    # reference, which is what its prepared launch runs on the CPU, on every call
    monkeypatch.setattr(combine_module, "downproj_combine", dataclasses.replace(real, reference=recording))
    return calls


@pytest.mark.parametrize("family", sorted(BLOCK))
@pytest.mark.parametrize("patterns", ["downproj_combine", "softmax_router,downproj_combine"])
def test_the_combine_piece_runs_at_decode_with_scores_in_t(family, patterns, spy):
    model = build(family)
    prompt = mx.random.randint(1, 512, (1, 7), key=mx.random.key(5))
    stock = forward(model, prompt, 2, True)
    result = zmlx.patch(model, patterns=patterns)
    try:
        blocks = _blocks(model, family)
        for name in patterns.split(","):
            assert len(result.patterns[name].patched) == len(blocks), name
        # both pieces in one function per block class: the registry merged them
        assert len({type(b).__call__ for b in blocks}) == 1
        patched = forward(model, prompt, 2, True)
        again = pickle.loads(pickle.dumps(model))  # the merged method is rebuilt by name
        assert type(_blocks(again, family)[0]).__call__ is type(blocks[0]).__call__
    finally:
        zmlx.unpatch(model)
    assert len(spy) == 2 * len(blocks)  # the two decode steps, not the prompt
    assert all(s == h for _, s, h in spy) and spy[0][1] == mx.bfloat16
    for s, p in zip(stock, patched, strict=True):
        assert mx.array_equal(s, p).item()


def test_gpt_oss_keeps_its_biased_experts_and_takes_only_the_route(spy):
    model = build("gpt_oss")
    result = zmlx.patch(model, patterns="softmax_router,downproj_combine")
    zmlx.unpatch(model)
    assert result.patterns["softmax_router"].patched and not result.patterns["downproj_combine"].patched
    assert any("biases" in why for _, why in result.patterns["downproj_combine"].skipped)
