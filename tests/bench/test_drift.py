"""The drift tool: zero for identical models, the injected error where it is injected."""

import pytest

from zmlx import backend, synth
from zmlx.bench.drift import drift
from zmlx.bench.harness import make_prompt
from zmlx.cli.drift import command


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
        command("synth:glm4_moe_lite/tiny/affine4", patterns="no_such_pattern")
    assert e.value.exit_code == 2 and "no_such_pattern" in capsys.readouterr().err


def _refused(capsys, *args, **kwargs) -> str:
    """The command with bad input: exit 2 and one `error:` line, nothing measured."""
    import typer

    with pytest.raises(typer.Exit) as e:
        command(*args, **kwargs)
    out = capsys.readouterr()
    assert e.value.exit_code == 2 and out.out == ""
    (line,) = out.err.strip().splitlines()
    assert line.startswith("error: ")
    return line


@pytest.mark.parametrize("perturb", [float("nan"), float("inf"), -0.01])
def test_the_command_refuses_a_perturbation_that_is_not_a_finite_size(capsys, perturb):
    line = _refused(capsys, "synth:glm4_moe_lite/tiny/affine4", perturb=perturb, steps=1)
    assert f"--perturb {perturb}: must be a finite number >= 0" in line


def test_the_library_refuses_a_nan_perturbation(two_tiny):
    with pytest.raises(ValueError, match="perturb nan"):
        drift(*two_tiny, make_prompt(two_tiny[0].args.vocab_size, 8), steps=1, perturb=float("nan"))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"patterns": ","}, "empty pattern list in --patterns"),
        ({"steps": 0}, "--steps 0: must be at least 1"),
        ({"prompt_tokens": 1}, "--prompt-tokens 1: must be at least 2"),
    ],
)
def test_the_command_checks_its_arguments_as_validate_does(capsys, kwargs, message):
    assert message in _refused(capsys, "synth:glm4_moe_lite/tiny/affine4", **kwargs)


def test_a_bad_spec_is_one_line(capsys):
    assert "bad spec 'synth:bogus'" in _refused(capsys, "synth:bogus")


@pytest.mark.skipif(backend.current() != "cpu", reason="MLX's GPU backends run unquantized experts in bf16")
def test_a_model_mlx_cannot_run_here_is_one_line_with_the_hint(capsys):
    line = _refused(capsys, "synth:glm4_moe_lite/tiny/bf16", steps=1, prompt_tokens=4)
    assert "MLX could not run synth:glm4_moe_lite/tiny/bf16 on cpu: [GatherMM::eval]" in line
    assert "use a quantized checkpoint" in line
