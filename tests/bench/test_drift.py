"""The drift tool: zero for identical models, the injected error where it is injected."""

import pytest

from zmlx import synth
from zmlx.bench.drift import drift, main
from zmlx.bench.harness import make_prompt


@pytest.fixture(scope="module")
def two_tiny():
    spec = "synth:glm4_moe_lite/tiny/affine4"
    return synth.build(spec)[0], synth.build(spec)[0]


def test_identical_models_do_not_drift(two_tiny):
    stock, other = two_tiny
    res = drift(stock, other, make_prompt(stock.args.vocab_size, 8), steps=2)
    assert len(res.layers) == len(stock.model.layers) and len(res.steps) == 2
    for d in res.layers:
        assert d.local == [0.0, 0.0] and d.carried == [0.0, 0.0]
        assert all(r == 0 for r in d.routes)
    assert all(s.argmax_equal and s.max_abs_dlogit == 0 for s in res.steps)
    # the MoE layers report routings, the dense first layer does not
    assert res.layers[0].routes == [] and len(res.layers[1].routes) == 2


def test_an_injected_error_shows_at_its_size(two_tiny):
    stock, other = two_tiny
    eps = 2**-6
    res = drift(stock, other, make_prompt(stock.args.vocab_size, 8), steps=2, perturb=eps)
    for d in res.layers:  # the local error is the injected one (bf16 output rounding aside)
        assert all(eps / 3 < e < 3 * eps for e in d.local), d
    assert res.layers[0].carried[0] > 0


def test_a_prompt_of_one_token_is_refused(two_tiny):
    with pytest.raises(ValueError, match="at least 2"):
        drift(*two_tiny, [5], steps=1)


def test_the_command_refuses_unknown_patterns(capsys):
    import typer

    with pytest.raises(typer.Exit) as e:
        main("synth:glm4_moe_lite/tiny/affine4", patterns="no_such_pattern")
    assert e.value.exit_code == 2 and "no_such_pattern" in capsys.readouterr().err
