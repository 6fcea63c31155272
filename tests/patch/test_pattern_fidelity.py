"""Pattern.fidelity_on: one answer for the patch report, the presets' check and the
patterns table."""

import os
import subprocess
import sys

from zmlx.patch import PATTERNS


def test_a_pattern_without_kernels_is_exact_only_where_exact_on_says():
    p = PATTERNS["compiled_decode"]
    assert p.kernels == () and p.exact_on == ("cpu",)
    assert [p.fidelity_on(b) for b in ("cpu", "cuda", "metal")] == ["exact", "close", "close"]


def test_a_pattern_with_kernels_takes_its_kernels_fidelity():
    p = PATTERNS["moe_block"]  # close, every kernel exact on CUDA
    assert p.fidelity == "close"
    assert p.fidelity_on("cuda") == "exact" and p.fidelity_on("metal") == "close"
    assert PATTERNS["mla_attention"].fidelity_on("cuda") == "close"
    assert PATTERNS["moe_router"].fidelity_on("metal") == "exact"


def test_the_patterns_table_says_where_a_close_pattern_is_exact():
    env = {**os.environ, "COLUMNS": "400"}
    out = subprocess.run(
        [sys.executable, "-m", "zmlx", "patterns"], capture_output=True, text=True, env=env, check=True
    ).stdout
    rows = [line for line in out.splitlines() if "compiled_decode" in line]
    assert rows and "close (exact on cpu)" in rows[0], rows
