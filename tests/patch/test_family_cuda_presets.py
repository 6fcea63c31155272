"""On the GPU, every family's CUDA default preset keeps stock's logits bitwise (tiny random
models of mlx-lm's own classes, affine 4-bit, bf16: test_family_exactness's), prompts and
decode steps, batch 1 and 2, with and without a cache; the YaRN families also with their
rope. A pattern joins a family's CUDA preset only once this passes on a GPU: a default preset
promises stock's tokens."""

from __future__ import annotations

import pytest
from test_family_exactness import FAMILY_NAMES, YARN, _check_bitwise, build

from zmlx.families import FAMILIES

CASES = [(f, False) for f in FAMILY_NAMES] + [(f, True) for f in sorted(YARN)]


@pytest.mark.cuda
@pytest.mark.parametrize("family,yarn", CASES)
def test_on_cuda_the_family_preset_is_bitwise_stock(family, yarn):
    preset = FAMILIES[family].preset_on("cuda")
    assert preset, family
    _check_bitwise(build(family, yarn=yarn), preset)


def test_every_family_with_a_cuda_preset_is_a_case():
    """A family added to FAMILIES with a CUDA preset is checked here too (the cases are not a
    list kept by hand)."""
    with_cuda = {f for f in FAMILIES if "cuda" in FAMILIES[f].presets_on}
    assert with_cuda - {"glm4_moe_lite"} <= {f for f, _ in CASES}
