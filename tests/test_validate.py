"""python -m zmlx.validate: PASS on the synthetic model, FAIL when a pattern is wrong,
exit 2 with one line and no traceback on bad input."""

import json
import subprocess
import sys

import pytest
import typer

from zmlx import fidelity, synth
from zmlx.cli import validate as validate_cli

SPEC = "synth:glm4_moe_lite/tiny/affine4"


def run(*args, module="zmlx.validate"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return synth.write(SPEC, tmp_path_factory.mktemp("ckpt") / "glm47-tiny")


@pytest.mark.slow
def test_validate_passes_on_a_checkpoint_directory(checkpoint):
    # --no-accuracy: identical tokens PASS either way; the accuracy rule's CLI report is
    # test_accuracy's (test_the_cli_prints_the_accuracy_table), a wrong pattern's below
    p = run(str(checkpoint), "--max-tokens", "24", "--runs", "2", "--no-accuracy")
    assert p.returncode == 0, p.stderr
    assert "PASS" in p.stdout and "24/24" in p.stdout
    assert "moe_router" in p.stdout and "decode tok/s" in p.stdout


@pytest.mark.slow
def test_validate_json(checkpoint):
    p = run(
        str(checkpoint),
        "--max-tokens",
        "16",
        "--runs",
        "1",
        "--json",
        "--patterns",
        "moe_router",
        "--no-accuracy",
    )
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["verdict"] == "PASS"
    assert report["identical"] == report["total"] == 16
    assert report["patterns"] == ["moe_router"]
    assert report["teacher_forced_top1"] == 1.0 and report["max_abs_dlogit"] == 0.0
    assert report["quantization"] == "affine4/g64"
    assert len(report["stock"]) == len(report["patched"]) == 1
    assert report["stock_median"]["decode_tps"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["/no/such/dir"], "no such path"),
        (["."], "not an mlx-lm model"),
        (["synth:glm4_moe_lite/tiny"], "use synth:FAMILY/PRESET/QUANT"),
        ([SPEC, "--patterns", "moe_rooter"], "unknown pattern(s) in --patterns: moe_rooter"),
        ([SPEC, "--runs", "0"], "at least 1"),
        ([SPEC, "--patterns", ","], "empty pattern list in --patterns (','): use none for no patterns"),
        ([SPEC, "--exclude", ""], "empty pattern list in --exclude"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    p = run(*args)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_unloadable_checkpoint_exits_2(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no_such_model_type"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    p = run(str(tmp_path))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "could not load" in p.stderr


def test_a_wrong_pattern_fails_validation(monkeypatch, capsys):
    """Exit 1 and the first divergence when the patched model's tokens differ."""
    from zmlx.patch.patterns import moe_router as pattern_module

    real = pattern_module.moe_router

    def wrong_router(gates, bias, **kw):
        inds, scores = real(gates, bias, **kw)
        return inds[..., ::-1], scores  # each expert's output gets another's weight

    monkeypatch.setattr(pattern_module, "moe_router", wrong_router)
    status = validate_cli.main_command(SPEC, max_tokens=32, runs=1, as_json=True)
    report = json.loads(capsys.readouterr().out)
    assert status == 1 and report["verdict"] == "FAIL"
    d = report["first_divergence"]
    assert d is not None and d["stock_token"] != d["patched_token"]
    assert report["identical"] == d["position"] < 32
    assert report["max_abs_dlogit"] > 0
    # nor is it accurate: a wrong kernel is not rescued by the accuracy rule
    assert report["accuracy"] is not None and not report["accuracy"]["accurate"]
    assert report["accuracy"]["reasons"]


@pytest.mark.slow
def test_zmlx_command_has_the_subcommands():
    p = subprocess.run([sys.executable, "-m", "zmlx.cli", "--help"], capture_output=True, text=True)
    assert p.returncode == 0
    for sub in ("validate", "synth", "patterns"):
        assert sub in p.stdout


# ---------------------------------------------------------------- nothing to validate


def _exit_2(capsys, *args, **kwargs) -> str:
    """Runs main_command, expects exit status 2; returns stdout + stderr."""
    with pytest.raises(typer.Exit) as e:
        validate_cli.main_command(*args, **kwargs)
    out = capsys.readouterr()
    assert e.value.exit_code == 2
    assert "PASS" not in out.out and "Traceback" not in out.err
    return out.out + out.err


def test_an_unsupported_family_has_nothing_to_validate(llama_checkpoint, capsys):
    """Not PASS with exit 0 (a proof of nothing), and the reason said once, not three times."""
    from zmlx.families import FAMILIES

    text = _exit_2(capsys, str(llama_checkpoint), max_tokens=4, runs=1)
    assert "gpt_oss" in FAMILIES and len(FAMILIES) >= 9  # the list below is every family
    assert text.strip().splitlines() == [
        "error: nothing to validate: model_type 'llama' has no zmlx patterns (supported: "
        f"{', '.join(sorted(FAMILIES))}); the model would run stock"
    ]


def test_everything_excluded_or_none_has_nothing_to_validate(capsys):
    text = _exit_2(capsys, SPEC, exclude="moe_router,moe_combine", max_tokens=4, runs=1)
    assert text.strip() == (
        "error: nothing to validate: every selected pattern is left out "
        "(moe_router: excluded, moe_combine: excluded)"
    )
    text = _exit_2(capsys, SPEC, patterns="none", max_tokens=4, runs=1)
    assert text.strip() == "error: nothing to validate: no patterns selected (none)"


def test_no_module_matched_has_nothing_to_validate(monkeypatch):
    """A supported family whose modules every selected pattern skips: the library raises
    NothingToValidate with each pattern's reason."""
    import zmlx
    from zmlx.patch.patterns import moe_router

    monkeypatch.setitem(
        zmlx.PATTERNS,
        "moe_router",
        moe_router.PATTERN.__class__(
            **{**moe_router.PATTERN.__dict__, "check": lambda module, params: "not this one"}
        ),
    )
    model, tok = synth.build(SPEC)
    with pytest.raises(
        fidelity.NothingToValidate,
        match=r"nothing to validate: no module matched the selected patterns "
        r"\(moe_router: not this one\)",
    ):
        fidelity.validate(model, tok, patterns="moe_router", max_tokens=4, runs=1)
    assert not zmlx.is_patched(model)
