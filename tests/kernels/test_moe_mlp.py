"""moe_mlp: gate + up + SwiGLU of the routed experts in one launch.

On CUDA the kernel follows MLX's qmv and compiled swiglu operation for operation: bitwise
stock wherever stock runs qmv (fewer than 8 expert rows). The Metal body sums in float32
in another order (`close`): it is held to the float32 reference with stock's own error as
the bar (at most 2x stock's largest error, plus one rounding of the output dtype)."""

import mlx.core as mx
import pytest
from mlx_lm.models.activations import swiglu
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from zmlx.kernels import metal_emu
from zmlx.kernels.core import Launch
from zmlx.kernels.moe_mlp import launch, moe_mlp, quantized_experts, reference, reference_f32

CASES = [  # (tokens shape, experts, k, rows I, width D, group, bits)
    ((1, 1), 8, 4, 24, 256, 64, 4),  # GLM-4.7-Flash's kind of call, small
    ((1, 1), 6, 2, 7, 384, 128, 4),  # odd rows
    ((2,), 5, 3, 9, 256, 32, 8),
    ((1, 1), 4, 1, 16, 128, 64, 8),
    ((1, 1), 8, 4, 24, 256, None, None),  # unquantized experts (gemv order, 4 per lane)
    ((2,), 5, 3, 9, 192, None, None),  # 2 per lane
]


def _inputs(lead, experts, k, rows, d, gs, bits, dtype, seed=0):
    x = mx.random.normal((*lead, d), key=mx.random.key(seed)).astype(dtype)
    inds = mx.random.randint(0, experts, (*lead, k), key=mx.random.key(seed + 1)).astype(mx.uint32)
    g = quantized_experts(experts, rows, d, group_size=gs, bits=bits, dtype=dtype, seed=seed + 2)
    u = quantized_experts(experts, rows, d, group_size=gs, bits=bits, dtype=dtype, seed=seed + 3)
    return (x, inds, *g, *u), dict(group_size=gs, bits=bits)


def test_reference_is_mlx_lm_switch_glu_gate_and_up():
    lead, experts, k, rows, d, gs, bits = CASES[0]
    gate = QuantizedSwitchLinear(d, rows, experts, bias=False, group_size=gs, bits=bits)
    up = QuantizedSwitchLinear(d, rows, experts, bias=False, group_size=gs, bits=bits)
    x = mx.random.normal((*lead, d)).astype(mx.bfloat16)
    inds = mx.array([[[1, 3, 0, 7]]], dtype=mx.uint32)
    xe = mx.expand_dims(x, (-2, -3))
    want = swiglu(gate(xe, inds), up(xe, inds)).squeeze(-2)  # SwitchGLU's activation(x_up, x_gate)
    got = reference(
        x,
        inds,
        gate.weight,
        gate.scales,
        gate.biases,
        up.weight,
        up.scales,
        up.biases,
        group_size=gs,
        bits=bits,
    )
    assert mx.array_equal(got, want).item()


def test_launch_says_why_it_takes_the_reference():
    args, kw = _inputs(*CASES[0], mx.bfloat16)
    assert "4/8-bit" in launch("cuda", *args, group_size=64, bits=3).reason
    assert "without biases" in launch("cuda", *args[:4], None, *args[5:7], None, **kw).reason
    assert "indices" in launch("cuda", args[0], args[1].astype(mx.int32), *args[2:], **kw).reason
    assert launch("cuda", *args, **kw).grid == (1 * 4 * 24 * 32, 1, 1)


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, case, dtype):
    if None in case and dtype != mx.float32:
        pytest.skip("MLX's CPU gather_mm (the reference) runs only float32")
    args, kw = _inputs(*case, dtype, seed=case[4] + (case[6] or 0))
    got = metal_emu.run(moe_mlp, *args, workdir=tmp_path_factory.getbasetemp(), **kw)  # poisoned NaN
    want, bar = close_bar(reference, reference_f32, args, kw, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    assert mx.abs(got.astype(mx.float32) - want).max().item() <= bar


def test_cuda_takes_only_stock_qmv_calls():
    """On CUDA the kernel serves what stock runs through qmv: < 8 expert rows, scales in x's dtype."""
    args, kw = _inputs((2, 1), 8, 4, 24, 256, 64, 4, mx.bfloat16)  # 2 tokens x 4 experts = 8 rows
    assert "tiled qmm" in launch("cuda", *args, **kw).reason
    assert isinstance(launch("metal", *args, **kw), Launch)  # Metal is close anyway
    args, kw = _inputs(*CASES[0], mx.bfloat16)
    f16 = [a.astype(mx.float16) if i in (3, 4, 6, 7) else a for i, a in enumerate(args)]  # scales, biases
    assert "dtype" in launch("cuda", *f16, **kw).reason


@pytest.mark.cuda
@pytest.mark.parametrize(
    "case",
    CASES
    + [
        ((1, 1), 64, 4, 1536, 2048, 64, 4),  # GLM-4.7-Flash
        ((1, 1), 64, 4, 1536, 2048, None, None),  # and in bf16
        ((7,), 9, 1, 40, 1536, 32, 4),  # 7 rows, remainder tile
        ((1,), 8, 4, 33, 2048, 128, 8),
    ],
)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_cuda_kernel_is_bitwise_stock(case, dtype):
    args, kw = _inputs(*case, dtype, seed=case[4] + (case[6] or 0))
    got = moe_mlp.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    want = reference(*args, **kw)
    assert got.dtype == dtype and got.shape == want.shape
    assert mx.array_equal(got, want).item(), mx.abs(got.astype(mx.float32) - want).max().item()


def test_unquantized_experts_take_the_kernel_in_stock_gemv_regime():
    args, kw = _inputs((1, 1), 8, 4, 24, 256, None, None, mx.bfloat16)
    assert launch("cuda", *args, **kw).template[5:7] == [("GS", 256), ("BITS", 32)]
    f32 = [a.astype(mx.float32) if i in (2, 5) else a for i, a in enumerate(args)]  # weights
    assert "unquantized weights" in launch("cuda", *f32, **kw).reason
    many, kw = _inputs((16,), 8, 4, 24, 256, None, None, mx.bfloat16)  # 64 rows: stock sorts
    assert "gemv" in launch("cuda", *many, **kw).reason
