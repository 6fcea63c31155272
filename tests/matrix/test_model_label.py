"""A layer-faithful synthetic model (real per-layer shapes, fewer layers) is labelled as such in
the loaded model's source, in every ledger line measured on it, and in the report's titles:
its name alone would pass for the real model."""

import json
import os
import subprocess
import sys

import pytest

from zmlx import models, synth
from zmlx.matrix import summary as S
from zmlx.synth_families import FAMILIES


def matrix(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZMLX_")}
    return subprocess.run(
        [sys.executable, "-m", "zmlx.matrix", *args], capture_output=True, text=True, env=env
    )


LABEL = "layer-faithful: test label"


@pytest.fixture
def labelled(monkeypatch):
    # the real layer-faithful presets are tens of GB: label the tiny one the same way
    monkeypatch.setitem(FAMILIES["deepseek_v3"].faithful, "tiny", LABEL)


def test_the_source_carries_the_label(labelled, tmp_path):
    assert models.load("synth:deepseek_v3/tiny/affine4")[2].label == LABEL
    out = synth.write("synth:deepseek_v3/tiny/affine4", tmp_path / "ckpt")
    assert models.load(str(out))[2].label == LABEL  # read back from the checkpoint's config
    assert models.load("synth:qwen3_moe/tiny/affine4")[2].label is None


@pytest.mark.slow
def test_ledger_lines_and_report_titles_say_it(labelled, tmp_path):
    out = synth.write("synth:deepseek_v3/tiny/affine4", tmp_path / "ckpt")
    ledger = tmp_path / "m.jsonl"
    p = matrix(
        "run", str(out), "--patterns", "none", "--runs", "1", "--max-tokens", "2", "--ledger", str(ledger)
    )
    assert p.returncode == 0, p.stderr
    line = json.loads(ledger.read_text().splitlines()[0])
    assert line["model_label"] == LABEL
    p = matrix("report", "--markdown", "--ledger", str(ledger))
    assert f"[{LABEL}]" in p.stdout.splitlines()[0]
    rows = S.summarize([line])
    assert S.title(rows[0]["model"], rows[0]["quantization"], rows[0]["device"], rows).endswith(f"[{LABEL}]")


@pytest.mark.slow
def test_validate_says_it(labelled, tmp_path):
    out = synth.write("synth:deepseek_v3/tiny/affine4", tmp_path / "ckpt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZMLX_")}
    args = [
        sys.executable,
        "-m",
        "zmlx.validate",
        str(out),
        "--runs",
        "1",
        "--max-tokens",
        "2",
        "--no-accuracy",
        "--patterns",
        "moe_router",
        "--json",
    ]
    p = subprocess.run(args, capture_output=True, text=True, env=env)
    assert p.returncode in (0, 1), p.stderr
    assert json.loads(p.stdout)["model_label"] == LABEL
