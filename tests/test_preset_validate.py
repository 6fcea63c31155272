"""`zmlx validate --preset`: checked like every command's options, and passed to the patch and
the accuracy rule (the fast preset's evidence check is in tests/test_presets.py)."""

import dataclasses
import json

from typer.testing import CliRunner

from zmlx.cli import app
from zmlx.families import FAMILIES

FAMILY = "glm4_moe_lite"
TINY = "synth:glm4_moe_lite/tiny/affine4"


def test_validate_takes_the_preset(monkeypatch):
    bad = CliRunner().invoke(app, ["validate", TINY, "--preset", "quick"])
    assert bad.exit_code == 2, bad.output
    assert bad.stderr.strip() == "error: unknown preset 'quick' in --preset; valid: default, fast"
    fam = dataclasses.replace(FAMILIES[FAMILY], fast_on={"cpu": {"mla_attention": "0123456789"}})
    monkeypatch.setitem(FAMILIES, FAMILY, fam)
    args = [
        "validate",
        TINY,
        "--preset",
        "fast",
        "--max-tokens",
        "3",
        "--runs",
        "1",
        "--no-accuracy",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    assert "mla_attention" in report["patterns"]
    assert report["patch"]["preset"] == "fast" and report["patch"]["close"] == ["mla_attention"]
