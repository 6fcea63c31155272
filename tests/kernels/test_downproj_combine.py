"""downproj_combine: the experts' down projection, routing weights and shared expert in one
launch. On CUDA bitwise stock (qmv's arithmetic for the dot, moe_combine's after it) where
stock runs qmv (fewer than 8 expert rows). The Metal body is `close`: held to a float32
reference with stock's own error as the bar (2x stock's largest error plus one output rounding)."""

import mlx.core as mx
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from zmlx.kernels import metal_emu
from zmlx.kernels.downproj_combine import downproj_combine, launch, reference, reference_f32
from zmlx.kernels.moe_combine import reference as combine
from zmlx.kernels.moe_mlp import quantized_experts

CASES = [  # (tokens shape, experts, k, expert width I, output D, group, bits, with shared)
    ((1, 1), 8, 4, 256, 40, 64, 4, True),
    ((1, 1), 6, 3, 384, 7, 128, 4, False),  # odd outputs
    ((2,), 5, 2, 256, 9, 32, 8, True),
    ((1, 1), 4, 1, 128, 16, 64, 8, True),
    ((1, 1), 8, 4, 256, 40, None, None, True),  # unquantized experts
    ((2,), 5, 2, 192, 9, None, None, False),
]


def _inputs(lead, experts, k, i, d, gs, bits, with_shared, dtype, seed=0):
    h = mx.random.normal((*lead, k, i), key=mx.random.key(seed)).astype(dtype)
    inds = mx.random.randint(0, experts, (*lead, k), key=mx.random.key(seed + 1)).astype(mx.uint32)
    scores = mx.random.uniform(shape=(*lead, k), key=mx.random.key(seed + 2)) * 1.8
    w = quantized_experts(experts, d, i, group_size=gs, bits=bits, dtype=dtype, seed=seed + 3)
    shared = mx.random.normal((*lead, d), key=mx.random.key(seed + 4)).astype(dtype) if with_shared else None
    return (h, inds, scores, *w, shared), dict(group_size=gs, bits=bits)


def test_reference_is_mlx_lm_down_proj_then_combine():
    lead, experts, k, i, d, gs, bits, _ = CASES[0]
    down = QuantizedSwitchLinear(i, d, experts, bias=False, group_size=gs, bits=bits)
    h = mx.random.normal((*lead, k, i)).astype(mx.bfloat16)
    inds = mx.array([[[1, 3, 0, 7]]], dtype=mx.uint32)
    scores = mx.random.uniform(shape=(*lead, k))
    shared = mx.random.normal((*lead, d)).astype(mx.bfloat16)
    y = down(mx.expand_dims(h, -2), inds).squeeze(-2)  # SwitchGLU's down_proj + squeeze
    want = combine(y, scores, shared)
    got = reference(h, inds, scores, down.weight, down.scales, down.biases, shared, group_size=gs, bits=bits)
    assert mx.array_equal(got, want).item()


def test_launch_says_why_it_takes_the_reference():
    args, kw = _inputs(*CASES[0], mx.bfloat16)
    assert "4/8-bit" in launch("cuda", *args, group_size=64, bits=2).reason
    # scores in float32 (a gate module's) or in h's dtype (a softmax router's): the sum's dtype
    assert dict(launch("cuda", *args, **kw).template)["A"] == mx.float32
    in_t = launch("cuda", *args[:2], args[2].astype(mx.bfloat16), *args[3:], **kw)
    assert dict(in_t.template)["A"] == mx.bfloat16
    f16 = args[2].astype(mx.float16)
    assert "not float32 or h's dtype" in launch("cuda", *args[:2], f16, *args[3:], **kw).reason
    assert "shared expert" in launch("cuda", *args[:6], args[6][..., :3], **kw).reason
    assert launch("cuda", *args, **kw).grid == (40 * 32, 1, 1)


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("scores_in_t", [False, True], ids=["scores_f32", "scores_in_t"])
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, case, dtype, scores_in_t):
    if None in case and dtype != mx.float32:
        pytest.skip("MLX's CPU gather_mm (the reference) runs only float32")
    args, kw = _inputs(*case, dtype, seed=case[3] + (case[6] or 0))
    if scores_in_t:
        args = (*args[:2], args[2].astype(dtype), *args[3:])
    got = metal_emu.run(downproj_combine, *args, workdir=tmp_path_factory.getbasetemp(), **kw)
    want, bar = close_bar(reference, reference_f32, args, kw, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    assert mx.abs(got.astype(mx.float32) - want).max().item() <= bar


def test_cuda_takes_only_stock_qmv_calls():
    args, kw = _inputs((2, 1), 8, 4, 256, 40, 64, 4, True, mx.bfloat16)  # 2 tokens x 4 experts
    assert "tiled qmm" in launch("cuda", *args, **kw).reason
    args, kw = _inputs(*CASES[0], mx.bfloat16)
    f16 = [a.astype(mx.float16) if i in (4, 5) else a for i, a in enumerate(args)]
    assert "dtype" in launch("cuda", *f16, **kw).reason


@pytest.mark.cuda
@pytest.mark.parametrize(
    "case",
    CASES
    + [
        ((1, 1), 64, 4, 1536, 2048, 64, 4, True),  # GLM-4.7-Flash
        ((1, 1), 64, 4, 1536, 2048, None, None, True),  # and in bf16
        ((7,), 9, 1, 1536, 24, 32, 4, True),  # remainder tile
        ((1,), 8, 4, 2048, 33, 128, 8, False),
    ],
)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize(
    "scores_in_t", [False, True], ids=["scores_f32", "scores_in_t"]
)  # a gate module's float32, a softmax router's T
def test_cuda_kernel_is_bitwise_stock(case, dtype, scores_in_t):
    args, kw = _inputs(*case, dtype, seed=case[3] + (case[6] or 0))
    if scores_in_t:
        args = (*args[:2], args[2].astype(dtype), *args[3:])
    got = downproj_combine.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    want = reference(*args, **kw)
    assert got.dtype == dtype and got.shape == want.shape
    assert mx.array_equal(got, want).item(), mx.abs(got.astype(mx.float32) - want).max().item()
