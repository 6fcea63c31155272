"""benchmarks/gpu/diagnose_compiled.py on the CPU: there compiled_decode is bitwise stock, so
every step of the eager, static-path and compiled runs agrees bitwise; and the static path
really runs uncompiled inside `compiled_decode.uncompiled` (a trace per step)."""

from pathlib import Path

import mlx.core as mx
from script_loader import load_script

import zmlx
from zmlx.patch.patterns import compiled_decode

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "diagnose_compiled.py"


def _script():
    return load_script("gpu/diagnose_compiled.py")


def test_on_the_cpu_all_three_runs_are_bitwise(tiny_q4):
    model, _ = tiny_q4
    rows = _script().diagnose(model, "moe_router,moe_combine", 3)
    assert rows == [("bitwise", "bitwise")] * 3


def test_uncompiled_runs_the_trace_function_every_step(tiny_q4):
    model, _ = tiny_q4
    zmlx.patch(model, patterns="compiled_decode")
    try:
        cache = model.make_cache()
        mx.eval(model(mx.array([[3, 14, 15]]), cache=cache))
        with compiled_decode.uncompiled(model):
            for t in (5, 6, 7):
                mx.eval(model(mx.array([[t]]), cache=cache))
        assert compiled_decode.stats(model)["traces"] == 3  # eager: one "trace" per step
        mx.eval(model(mx.array([[8]]), cache=cache))
        mx.eval(model(mx.array([[9]]), cache=cache))
        assert compiled_decode.stats(model)["traces"] == 4  # compiled again: traced once
    finally:
        zmlx.unpatch(model)


def test_bad_input_is_one_line_and_exit_2():
    import subprocess
    import sys

    for args in (["synth:nope/tiny/bf16"], ["--steps", "0"], ["--patterns", "bogus"]):
        p = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (args, p.stderr)
        assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
