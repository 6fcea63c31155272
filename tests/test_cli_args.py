"""zmlx.cli.args: the checks validate, drift and matrix run share, and which errors become
one line with exit status 2 (and which keep their traceback)."""

import pytest
import typer

from zmlx.cli import args as cli_args
from zmlx.config import ConfigError
from zmlx.models import ModelLoadError


def test_at_least_names_every_low_option():
    cli_args.at_least(1, {"--runs": 1, "--max-tokens": 5})
    with pytest.raises(ConfigError, match="^--runs 0, --max-tokens -1: must be at least 1$"):
        cli_args.at_least(1, {"--runs": 0, "--max-tokens": -1, "--prompt-tokens": 3})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -1e-9])
def test_finite_refuses_nan_inf_and_below(value):
    with pytest.raises(ConfigError, match=r"--perturb .*: must be a finite number >= 0"):
        cli_args.finite("--perturb", value, at_least=0)


def test_finite_bounds():
    cli_args.finite("--perturb", 0.0, at_least=0)
    cli_args.finite("--max-memory-gb", None, above=0)
    with pytest.raises(ConfigError, match="> 0"):
        cli_args.finite("--max-memory-gb", 0.0, above=0)


def test_selection_checks_names_against_the_registry():
    assert cli_args.selection("moe_router", "--patterns") == ("moe_router",)
    assert cli_args.selection("none", "--patterns") == ()
    assert cli_args.selection(None, "--patterns") is None
    with pytest.raises(ConfigError, match="unknown pattern.*in --exclude: moe_rooter"):
        cli_args.selection("moe_rooter", "--exclude")


def test_a_bad_spec_is_refused_before_loading():
    cli_args.check_model_name("synth:glm4_moe_lite/tiny/affine4")
    cli_args.check_model_name("/some/path")  # paths are checked by the loader
    with pytest.raises(ModelLoadError, match="bad spec"):
        cli_args.check_model_name("synth:bogus")


def test_which_errors_are_one_line():
    assert cli_args.message_for(ConfigError("x")) == "x"
    assert cli_args.message_for(ModelLoadError("no such path: y")) == "no such path: y"
    mlx = RuntimeError("[GatherMM::eval] Currently only supports float32.")
    assert cli_args.message_for(mlx, "m").startswith("MLX could not run m on ")
    assert "use a quantized checkpoint" in cli_args.message_for(mlx, "m")
    # a bug keeps its traceback
    assert cli_args.message_for(RuntimeError("dictionary changed size during iteration")) is None
    assert cli_args.message_for(KeyError("k")) is None


def test_one_line_errors_exits_2_and_passes_the_rest_through(capsys):
    with pytest.raises(typer.Exit) as e:
        with cli_args.one_line_errors("m"):
            raise ConfigError("--runs 0: must be at least 1")
    assert e.value.exit_code == 2
    assert capsys.readouterr().err == "error: --runs 0: must be at least 1\n"
    with pytest.raises(KeyError):
        with cli_args.one_line_errors("m"):
            raise KeyError("a bug")
    with pytest.raises(typer.Exit) as e:  # click's Exit is a RuntimeError: not MLX's
        with cli_args.one_line_errors("m"):
            raise typer.Exit(0)
    assert e.value.exit_code == 0 and capsys.readouterr().err == ""
