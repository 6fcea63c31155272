"""moe_mlp's gpt-oss variant: the experts' gate and up projections with their own biases
(mlx-lm's SwitchLinear adds `bias[inds]` in T after the matmul) and SwigluOAI (mlx-lm's
compiled swiglu_oai: the gate clamped from above, up clipped, `(up + 1) * gate *
sigmoid(alpha * gate)`, every op in T). The reference is mlx-lm's own SwitchGLU layers and
activation; the Metal body (the emulation) is as close as stock to float32; the CUDA body
compiles (tests/kernels/test_cuda_compile.py) and is bitwise stock on the GPU (`cuda`). The
experts are affine-quantized, unquantized, or mxfp4 as the released gpt-oss's (e2m1 values,
one uint8 e8m0 scale per 32, no quantization biases, but the projections' own biases)."""

import mlx.core as mx
import pytest
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from zmlx.kernels import metal_emu
from zmlx.kernels.moe_mlp import _bits, launch, moe_mlp, quantized_experts, reference, reference_f32

OAI = (1.702, 7.0)  # gpt-oss's SwigluOAI (mlx-lm's defaults)
CASES = [  # (tokens shape, experts, k, rows I, width D, group, bits, mode)
    ((1, 1), 32, 4, 24, 256, 64, 4, "affine"),  # gpt-oss-20b's kind of call, small
    ((1, 1), 6, 3, 7, 384, 128, 4, "affine"),  # odd rows
    ((2,), 5, 3, 9, 256, 32, 8, "affine"),
    ((1, 1), 8, 4, 24, 256, None, None, "affine"),  # unquantized experts
    ((2,), 5, 3, 9, 192, None, None, "affine"),
    ((1, 1), 32, 4, 24, 256, 32, 4, "mxfp4"),  # the released gpt-oss's experts, small
    ((2,), 5, 3, 9, 288, 32, 4, "mxfp4"),  # odd rows, 9 groups of 32
]


def _case_id(case) -> str:
    """`mxfp4-E32k4-I24D256` style ids: pytest -k picks a mode or a shape."""
    lead, experts, k, rows, d, gs, bits, mode = case
    quant = "bf16" if bits is None else (mode if mode != "affine" else f"affine{bits}g{gs}")
    return f"{quant}-N{'x'.join(map(str, lead))}-E{experts}k{k}-I{rows}D{d}"


def _inputs(lead, experts, k, rows, d, gs, bits, mode, dtype, seed=0, scale=1.0):
    """x, inds, gate and up (weight, scales, biases), gate and up biases; `scale` > 1 drives
    gate and up past the limit (the clamps act)."""
    x = (mx.random.normal((*lead, d), key=mx.random.key(seed)) * scale).astype(dtype)
    inds = mx.random.randint(0, experts, (*lead, k), key=mx.random.key(seed + 1)).astype(mx.uint32)
    q = dict(group_size=gs, bits=bits, dtype=dtype, mode=mode)
    g = quantized_experts(experts, rows, d, seed=seed + 2, **q)
    u = quantized_experts(experts, rows, d, seed=seed + 3, **q)
    gb = (mx.random.normal((experts, rows), key=mx.random.key(seed + 4)) * 0.5).astype(dtype)
    ub = (mx.random.normal((experts, rows), key=mx.random.key(seed + 5)) * 0.5).astype(dtype)
    return (x, inds, *g, *u, gb, ub), dict(group_size=gs, bits=bits, mode=mode, oai=OAI)


def _projection(w, s, b, bias, gs, bits, mode):
    """mlx-lm's expert projection holding these weights and bias."""
    experts, rows = w.shape[:2]
    if s is None:
        proj = SwitchLinear(w.shape[-1], rows, experts, bias=True)
        proj.weight = w
    else:
        d = w.shape[-1] * 32 // bits
        proj = QuantizedSwitchLinear(d, rows, experts, bias=True, group_size=gs, bits=bits, mode=mode)
        proj.weight, proj.scales = w, s
        if b is not None:  # mxfp4 has no quantization biases
            proj.biases = b
    proj.bias = bias
    return proj


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_reference_is_mlx_lm_switch_glu_with_biases_and_swiglu_oai(case, dtype, scale):
    if case[5] is None and dtype != mx.float32:
        pytest.skip("MLX's CPU gather_mm runs only float32")
    args, kw = _inputs(*case, dtype, seed=case[4], scale=scale)
    x, inds, gw, gs_, gb_, uw, us, ub, gbias, ubias = args
    gate = _projection(gw, gs_, gb_, gbias, *case[5:])
    up = _projection(uw, us, ub, ubias, *case[5:])
    xe = mx.expand_dims(x, (-2, -3))
    want = SwigluOAI()(up(xe, inds), gate(xe, inds)).squeeze(-2)  # SwitchGLU's activation(x_up, x_gate)
    got = reference(*args, **kw)
    assert got.dtype == want.dtype == dtype
    assert mx.array_equal(got, want).item()
    # the clamps act at scale 16 (gate and up past the limit), and the biases count
    if scale > 1:
        pre = mx.abs(up(xe, inds)).max().item()
        assert pre > OAI[1], pre
    assert not mx.array_equal(got, reference(*args[:8], **kw)).item()


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, case, dtype, scale):
    if case[5] is None and dtype != mx.float32:
        pytest.skip("MLX's CPU gather_mm (the reference) runs only float32")
    args, kw = _inputs(*case, dtype, seed=case[4] + (case[6] or 0), scale=scale)
    got = metal_emu.run(moe_mlp, *args, workdir=tmp_path_factory.getbasetemp(), **kw)  # poisoned NaN
    want, bar = close_bar(reference, reference_f32, args, kw, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    assert mx.abs(got.astype(mx.float32) - want).max().item() <= bar
    # a body without the biases or the clamp would be far off
    plain = reference_f32(*args[:8], group_size=kw["group_size"], bits=kw["bits"], mode=kw["mode"])
    assert mx.abs(plain - want).max().item() > 4 * bar


def test_launch_takes_the_variant_and_says_why_not():
    args, kw = _inputs(*CASES[0], mx.bfloat16)
    spec = launch("cuda", *args, **kw)
    alpha, limit = _bits(1.702), _bits(7.0)
    assert [
        ("BIAS", True),
        ("OAI", True),
        ("ALPHA", alpha),
        ("LIMIT", limit),
        ("QMM", False),
        ("PIPE", False),
    ] == spec.template[-6:]
    assert limit == 0x40E00000 and len(spec.inputs) == 10
    plain = launch("cuda", *args[:8], group_size=64, bits=4, mode="affine").template
    assert ("BIAS", False) in plain and ("OAI", False) in plain
    assert "one of gate_proj and up_proj" in launch("cuda", *args[:9], None, **kw).reason
    f32 = args[-1].astype(mx.float32)
    assert "projection bias" in launch("cuda", *args[:9], f32, **kw).reason
    assert "alpha, limit" in launch("cuda", *args, group_size=64, bits=4, oai=(1.702, -7.0)).reason


@pytest.mark.cuda
@pytest.mark.parametrize(
    "case",
    CASES
    + [
        ((1, 1), 32, 4, 2880, 2880, 64, 4, "affine"),  # gpt-oss-20b
        ((1, 1), 32, 4, 2880, 2880, None, None, "affine"),  # and in bf16
        ((1, 1), 32, 4, 2880, 2880, 32, 4, "mxfp4"),  # and as released (mxfp4 experts)
        ((7,), 9, 1, 40, 1536, 32, 4, "affine"),  # 7 rows
        ((7,), 9, 1, 40, 1536, 32, 4, "mxfp4"),
    ],
    ids=_case_id,
)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_cuda_kernel_is_bitwise_stock(case, dtype, scale):
    args, kw = _inputs(*case, dtype, seed=case[4] + (case[6] or 0), scale=scale)
    got = moe_mlp.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    want = reference(*args, **kw)
    assert got.dtype == dtype and got.shape == want.shape
    assert mx.array_equal(got, want).item(), mx.abs(got.astype(mx.float32) - want).max().item()
