"""Fixtures of the block patterns' tests (moe_block, mla_block); their helpers are in
block_helpers.py."""

import mlx.core as mx
import pytest

from zmlx import synth
from zmlx.patch.patterns import mla_block, moe_block


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
