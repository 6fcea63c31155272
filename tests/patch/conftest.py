"""Fixtures of the block patterns' tests (moe_block, mla_block); their helpers are in
block_helpers.py."""

import mlx.core as mx
import pytest

from zmlx import synth
from zmlx.patch.patterns import mla_block, mla_prologue, moe_block


@pytest.fixture
def embedded_prologues(blocks_on_the_cpu, monkeypatch):
    """blocks_on_the_cpu, quant.QMM_ORDER on (mla_prologue's second launch is mla_q_prep_embed
    where it fits), and no mla_prologue block prepared before or after the test."""
    from zmlx.kernels import quant

    monkeypatch.setattr(quant, "QMM_ORDER", True)
    mla_prologue._BLOCKS.clear()
    yield
    mla_prologue._BLOCKS.clear()


@pytest.fixture
def blocks_on_the_cpu():
    """The CPU as the default device, and no block prepared before or after the test: the
    session's models are shared, so each test prepares its own."""
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    mla_block._BLOCKS.clear()
    moe_block._BLOCKS.clear()
    yield
    mla_block._BLOCKS.clear()
    moe_block._BLOCKS.clear()
    mx.set_default_device(before)


@pytest.fixture
def fresh_q4():
    """A tiny affine 4-bit model of the test's own, for a test that changes it."""
    return synth.build("synth:glm4_moe_lite/tiny/affine4")[0]


@pytest.fixture
def no_stock_attention(monkeypatch):
    """mla_block's and mla_prologue's decode steps may not fall back to mlx-lm's attention
    (prompts run mlx-lm's own layer): their shared attention_half refuses it."""
    from zmlx.patch import mla_layer

    def refuse(*a, **kw):
        raise AssertionError("a decode step ran mlx-lm's attention")

    monkeypatch.setattr(mla_layer, "stock_attention", refuse)
