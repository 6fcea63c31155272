"""swiglu_mlp: a dense MLP's gate + up + SwiGLU in one launch (moe_mlp's body, DENSE).

On CUDA bitwise stock wherever stock runs qmv (one row on the H100); the Metal body is
`close`: within 2x stock's own error of a float32 reference plus one output rounding."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.activations import swiglu

from zmlx.kernels import metal_emu
from zmlx.kernels.core import Launch
from zmlx.kernels.swiglu_mlp import launch, quantized_linear, reference, reference_f32, swiglu_mlp

CASES = [  # (tokens shape, rows I, width D, group, bits)
    ((1, 1), 24, 256, 64, 4),
    ((1, 1), 7, 384, 128, 4),  # odd rows, remainder tile
    ((3,), 9, 256, 32, 8),  # several tokens: Metal only (CUDA stock leaves qmv)
    ((1,), 16, 128, 64, 8),
    ((1, 1), 24, 256, None, None),  # unquantized (gemv order, 4 per lane)
    ((1,), 9, 192, None, None),  # 2 per lane
]


def _inputs(lead, rows, d, gs, bits, dtype, seed=0):
    x = mx.random.normal((*lead, d), key=mx.random.key(seed)).astype(dtype)
    g = quantized_linear(rows, d, group_size=gs, bits=bits, dtype=dtype, seed=seed + 1)
    u = quantized_linear(rows, d, group_size=gs, bits=bits, dtype=dtype, seed=seed + 2)
    return (x, *g, *u), dict(group_size=gs, bits=bits)


def test_reference_is_mlx_lm_dense_mlp_gate_and_up():
    d, rows = 256, 24
    gate, up = nn.QuantizedLinear(d, rows, bias=False), nn.QuantizedLinear(d, rows, bias=False)
    x = mx.random.normal((1, 1, d)).astype(mx.bfloat16)
    want = swiglu(gate(x), up(x))  # Glm4MoeLiteMLP before its down_proj
    got = reference(
        x,
        gate.weight,
        gate.scales,
        gate.biases,
        up.weight,
        up.scales,
        up.biases,
        group_size=gate.group_size,
        bits=gate.bits,
    )
    assert mx.array_equal(got, want).item()


def test_launch_says_why_it_takes_the_reference():
    args, kw = _inputs(*CASES[0], mx.bfloat16)
    assert "4/8-bit" in launch("cuda", *args, group_size=64, bits=3).reason
    assert "without biases" in launch("cuda", *args[:3], None, *args[4:6], None, **kw).reason
    assert "weights" in launch("cuda", args[0][..., :128], *args[1:], **kw).reason
    assert launch("cuda", *args, **kw).grid == (24 * 32, 1, 1)
    two, kw = _inputs((2, 1), 24, 256, 64, 4, mx.bfloat16)  # two tokens: stock's tiled qmm
    assert "tiled qmm" in launch("cuda", *two, **kw).reason
    assert isinstance(launch("metal", *two, **kw), Launch)
    f16 = [a.astype(mx.float16) if i in (2, 3, 5, 6) else a for i, a in enumerate(args)]  # scales, biases
    assert "dtype" in launch("cuda", *f16, **kw).reason


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_metal_body_is_as_close_as_stock(tmp_path_factory, case, dtype):
    args, kw = _inputs(*case, dtype, seed=case[2] + (case[4] or 0))
    got = metal_emu.run(swiglu_mlp, *args, workdir=tmp_path_factory.getbasetemp(), **kw)  # poisoned NaN
    want = reference_f32(*args, **kw)
    stock_err = mx.abs(reference(*args, **kw).astype(mx.float32) - want).max().item()
    ulp = {mx.bfloat16: 2**-8, mx.float16: 2**-11, mx.float32: 2**-18}[dtype]
    assert got.dtype == dtype and got.shape == want.shape
    bar = 2 * stock_err + ulp * mx.abs(want).max().item()
    assert mx.abs(got.astype(mx.float32) - want).max().item() <= bar


@pytest.mark.cuda
@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c[0] != (3,)]
    + [
        ((1, 1), 1536, 2048, 64, 4),  # GLM-4.7-Flash's shared expert
        ((1, 1), 10240, 2048, 64, 4),  # its dense first layer
        ((1, 1), 1536, 2048, None, None),  # the shared expert in bf16
        ((1,), 33, 2048, 128, 8),
    ],
)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_cuda_kernel_is_bitwise_stock(case, dtype):
    args, kw = _inputs(*case, dtype, seed=case[2] + (case[4] or 0))
    got = swiglu_mlp.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    want = reference(*args, **kw)
    assert got.dtype == dtype and got.shape == want.shape
    assert mx.array_equal(got, want).item(), mx.abs(got.astype(mx.float32) - want).max().item()
