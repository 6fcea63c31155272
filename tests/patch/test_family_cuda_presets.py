"""On the GPU, every family's CUDA default preset keeps stock's logits bitwise (tiny random
models of mlx-lm's own classes, affine 4-bit, bf16: test_family_exactness's, with the widths
stock's CUDA kernels serve), prompts and decode steps, batch 1 and 2, with and without a cache;
the YaRN families also with their rope. Stock must first repeat itself bitwise. A pattern joins
a family's CUDA preset only once this passes on a GPU: a default preset promises stock's
tokens."""

from __future__ import annotations

import pytest
from test_family_exactness import APPLIES, FAMILY_NAMES, YARN, _check_bitwise, applied, build

import zmlx
from zmlx.families import FAMILIES

WITH_CUDA_PRESET = [f for f in FAMILY_NAMES if FAMILIES[f].preset_on("cuda")]
CASES = [(f, False) for f in WITH_CUDA_PRESET] + [(f, True) for f in sorted(YARN)]


@pytest.mark.cuda
@pytest.mark.parametrize("family,yarn", CASES)
def test_on_cuda_the_family_preset_is_bitwise_stock(family, yarn):
    preset = FAMILIES[family].preset_on("cuda")
    _check_bitwise(build(family, yarn=yarn, cuda_widths=True), preset, stock_twice=True)


def test_every_family_with_a_cuda_preset_is_a_case():
    """A family added to FAMILIES with a CUDA preset is checked here too (the cases are not a
    list kept by hand)."""
    with_cuda = {f for f in FAMILIES if FAMILIES[f].preset_on("cuda")}
    assert with_cuda - {"glm4_moe_lite"} <= {f for f, _ in CASES}


def test_on_the_cuda_widths_every_pattern_applies_as_on_the_small_models():
    """The widths the GPU tests build with do not make a pattern step aside (the checks run on
    any backend; the logits are compared on the GPU, above): each pattern that applies to a
    family's small model applies, alone, to the wide one, with and without YaRN."""
    for family in FAMILY_NAMES:
        for yarn in (False, True) if family in YARN else (False,):
            model = build(family, yarn=yarn, cuda_widths=True)
            for pattern in sorted(APPLIES[family]):
                result = zmlx.patch(model, patterns=[pattern])
                zmlx.unpatch(model)
                assert applied(result) == {pattern}, (family, yarn, result.patterns[pattern])
