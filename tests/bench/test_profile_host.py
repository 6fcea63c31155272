"""benchmarks/gpu/profile_host.py on the CPU: one row per pattern set with the step's build,
issue and pipelined times, the model stock again after each set, one line for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
from script_loader import load_script

import zmlx

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "profile_host.py"


def test_rows_per_set_and_the_model_left_stock(tiny_q4):
    model, _ = tiny_q4
    rows = load_script("gpu/profile_host.py").run(model, ["none", "moe_block"], 2, 5, profile=False)
    assert [r[0] for r in rows] == ["none", "moe_block"]
    for _, build, issue, pipe in rows:
        assert 0 < build <= issue and pipe > 0
    assert zmlx.patch_result(model) is None


def test_a_longer_prompt_is_the_ledgers_seeded_ids(tiny_q4):
    model, _ = tiny_q4
    script = load_script("gpu/profile_host.py")
    assert script.prompt_of(model, None).tolist() == script.PROMPT
    from zmlx.bench.harness import make_prompt

    assert script.prompt_of(model, 40).tolist() == make_prompt(model.args.vocab_size, 40, 0)
    (row,) = script.run(model, ["none"], 2, 5, profile=False, prompt_tokens=40)
    assert row[0] == "none" and row[3] > 0


def test_kv_bits_decodes_over_the_quantized_cache(tiny_q4, monkeypatch):
    """--kv-bits: the steps run over mlx-lm's QuantizedKVCache (through mla_kv_quant)."""
    from zmlx.patch import quantized_attention

    model, _ = tiny_q4
    calls = []
    real = quantized_attention.attend
    monkeypatch.setattr(quantized_attention, "attend", lambda *a: calls.append(1) or real(*a))
    (row,) = load_script("gpu/profile_host.py").run(model, ["mla_kv_quant"], 2, 5, profile=False, kv_bits=8)
    assert row[0] == "mla_kv_quant" and row[3] > 0 and calls
    assert zmlx.patch_result(model) is None


def test_the_profile_names_zmlx_functions(tiny_q4):
    model, _ = tiny_q4
    text = load_script("gpu/profile_host.py").build_profile
    zmlx.patch(model, patterns="moe_block")
    try:
        import mlx.core as mx

        out = text(model, mx.array([3, 14, 15]), 2, 200)
    finally:
        zmlx.unpatch(model)
    assert "moe_block.py" in out and "cumulative" in out


@pytest.mark.parametrize(
    "args",
    [
        ["--steps", "0"],
        ["--sets", "none;no_such_pattern"],
        ["--prompt-tokens", "0"],
        ["--prompt-tokens", "x"],
        ["--kv-bits", "3"],
        ["--kv-bits", "8", "--ab", "tail", "1"],
        ["--ab", "nothing", "1"],
        ["--ab", "tail", "0"],
        ["--ab", "tail", "x"],
        ["--ab", "tail"],
        ["--kv-bits", "8", "--sets", "none"],
        ["--kv-bits", "8", "--sets", "mla_kv_quant;moe_router"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(args):
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "synth:glm4_moe_lite/tiny/affine4", *args],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr


def test_the_kernel_histogram_counts_per_step_most_frequent_first():
    from types import SimpleNamespace

    def ev(name, us):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [ev("qmv", 2.0), ev("copy", 1.0), ev("qmv", 4.0), ev("rms", 3.0), ev("copy", 1.0)] * 2
    rows = load_script("gpu/profile_host.py").histogram(events, steps=2)
    assert rows == [("qmv", 2.0, 6.0), ("copy", 2.0, 2.0), ("rms", 1.0, 3.0)]


def test_kernels_by_name_says_why_not_on_the_cpu(tiny_q4):
    import mlx.core as mx

    model, _ = tiny_q4
    text = load_script("gpu/profile_host.py").kernels_by_name(model, mx.array([3, 14]))
    assert text == "kernels by name need the CUDA backend (this is cpu)"


def test_the_tail_ab_times_both_settings_and_leaves_the_switch_as_it_was(capsys):
    """--ab tail on the CPU: both settings timed, alternated; the switch and blocks restored."""
    from zmlx.patch.patterns import mla_prologue

    before = mla_prologue.COMPILE_TAIL
    load_script("gpu/profile_host.py").main(
        ["synth:glm4_moe_lite/tiny/affine4", "--sets", "mla_prologue", "--steps", "2", "--ab", "tail", "1"]
    )
    out = capsys.readouterr().out
    assert "tail=eager" in out and "tail=compiled" in out
    assert mla_prologue.COMPILE_TAIL is before and not mla_prologue._BLOCKS


def test_the_moe_compiled_ab_times_both_settings_and_leaves_the_switch_as_it_was(capsys):
    """--ab moe_compiled on the CPU: both settings timed; moe_block.COMPILED and its blocks restored."""
    from zmlx.patch.patterns import moe_block

    before = moe_block.COMPILED
    load_script("gpu/profile_host.py").main(
        ["synth:glm4_moe_lite/tiny/affine4", "--sets", "moe_block", "--steps", "2"]
        + ["--ab", "moe_compiled", "1"]
    )
    out = capsys.readouterr().out
    assert "moe_compiled=eager" in out and "moe_compiled=compiled" in out
    assert moe_block.COMPILED is before and not moe_block._BLOCKS
