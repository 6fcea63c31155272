"""benchmarks/gpu/qmm_order_probe.py and its kernel (zmlx.kernels.qmm_rows) without a GPU:
each case's launch compiles with NVRTC (csrc/qmm_order.h, both 16-bit types, 4 and 8 bits),
the cases are stock's shapes (the heads case's gather is MultiLinear's batched quantized
matmul), the launch steps aside off CUDA, and without a GPU the script says so in one line."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from script_loader import load_script
from toolchain_marks import needs_nvrtc

from zmlx.kernels import cuda_check
from zmlx.kernels.core import Launch, Skip
from zmlx.kernels.qmm_rows import STOCK_QMM_ROWS, qmm_rows, reference

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "qmm_order_probe.py"
probe = load_script("gpu/qmm_order_probe.py")


@needs_nvrtc
@pytest.mark.parametrize("case", probe.CASES, ids=[c[0] for c in probe.CASES])
def test_every_case_compiles(case):
    _, kind, dtype, batches, experts, n, k, bits, group = case
    args, kw = probe.inputs(kind, dtype, batches, experts, n, k, bits, group)
    spec = qmm_rows.launch("cuda", *args, **kw)
    assert isinstance(spec, Launch), spec
    report = cuda_check.compile_launch(qmm_rows, spec, resources=True)  # raises if it does not compile
    assert "registers" in report and "0 bytes spill stores" in report, report


@pytest.mark.parametrize("case", probe.CASES, ids=[c[0] for c in probe.CASES])
def test_the_cases_are_stocks_shapes_and_the_gather_is_the_batched_matmul(case):
    """One output row per (row, expert) pair, N wide; the heads case's gather (lhs = rhs = the
    head) equals MultiLinear's batched quantized matmul; the control is below qmm's 8."""
    _, kind, dtype, batches, experts, n, k, bits, group = case
    args, kw = probe.inputs(kind, dtype, batches, experts, n, k, bits, group)
    want = probe.stock(kind, args, kw)
    assert want.shape == (batches, n) and want.dtype == dtype
    got = reference(*args, **kw)
    assert mx.array_equal(got, want).item()
    assert (batches >= STOCK_QMM_ROWS) == (not case[0].startswith("control"))


def test_the_launch_skips_what_it_does_not_take():
    args, kw = probe.inputs("gather", mx.bfloat16, 8, 9, 512, 256, 4, 64)
    assert isinstance(qmm_rows.launch("metal", *args, **kw), Skip)
    x = args[0].astype(mx.float32)
    assert "bf16 or half" in qmm_rows.launch("cuda", x, *args[1:], **kw).reason
    assert "groups of 32/64/128" in qmm_rows.launch("cuda", *args, group_size=64, bits=3).reason
    w, s, b = args[1:4]
    assert (
        "affine packing" in qmm_rows.launch("cuda", args[0], w, s.astype(mx.float32), *args[3:], **kw).reason
    )


def test_without_a_gpu_it_says_so_in_one_line_and_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert r.stdout.strip().startswith("error:") and len(r.stdout.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_an_out_that_is_a_file_is_one_line_and_left_alone(tmp_path):
    f = tmp_path / "results"
    f.write_text("mine")
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert r.stdout.strip() == f"error: --out {f} is not a directory" and f.read_text() == "mine"


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32)])
def test_the_three_dequantizations_are_what_their_names_say(bits, group):
    """T(T(q*s)+b) is T's own arithmetic (MLX's bf16 ops on the unpacked q), T(q*s+b) rounds
    the float value once, q*s+b is the float value; the exact sums are x @ those weights."""
    args, kw = probe.inputs("gather", mx.bfloat16, 8, 9, 128, 256, bits, group)
    x, w, s, b, lhs, rhs = args
    deq = probe.dequantized(w, s, b, dtype=mx.bfloat16, **kw)
    q = mx.dequantize(w, mx.ones_like(s), mx.zeros_like(b), **kw)  # the unpacked integers
    assert mx.array_equal(q, mx.round(q)).item() and q.max().item() == 2**bits - 1
    scale, bias = mx.repeat(s, group, axis=-1), mx.repeat(b, group, axis=-1)
    t2 = ((q * scale) + bias).astype(mx.float32)  # bf16 ops: each rounds
    assert np.array_equal(np.array(t2), deq["T(T(q*s)+b)"])
    exact = q.astype(mx.float32) * scale.astype(mx.float32) + bias.astype(mx.float32)
    assert np.array_equal(np.array(exact), deq["q*s+b"])
    assert np.array_equal(np.array(exact.astype(mx.bfloat16).astype(mx.float32)), deq["T(q*s+b)"])
    assert not np.array_equal(deq["T(q*s+b)"], deq["T(T(q*s)+b)"])  # the cases tell them apart
    sums = probe.exact_sums(args, kw)["q*s+b"]
    want = (x.astype(mx.float32)[lhs][:, 0][:, None, :] * exact[rhs]).sum(-1)
    assert sums.shape == (8, 128) and mx.allclose(sums.astype(mx.float32), want, rtol=1e-2, atol=1e-2).item()
