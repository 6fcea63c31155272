"""moe_down with the routed experts' biases (gpt-oss's down projection, a SwitchLinear with a
bias): each expert's row rounded to T, its bias added in T, then the weighted sum and the
residual add as without biases.

CPU: the reference equals mlx-lm's own ops (gpt-oss's MLPBlock from its experts' activations
on, through mlx-lm's QuantizedSwitchLinear / SwitchLinear with bias=True), not a copy of
itself; the Metal body through the emulation against a float32 truth; the launch's refusals.
`cuda`: bitwise the reference, outputs poisoned."""

import mlx.core as mx
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from zmlx.kernels import metal_emu
from zmlx.kernels.core import Skip
from zmlx.kernels.moe_down import launch, moe_down, reference, reference_f32
from zmlx.kernels.quant import weights_of

DTYPES = [mx.bfloat16, mx.float16, mx.float32]
# (tokens shape, experts, k, expert width I, outputs D, (group, bits) or (None, None): unquantized)
CASES = [
    ((1, 1), 8, 4, 256, 40, (64, 4)),  # gpt-oss's kind of call (top-4), small
    ((1,), 6, 3, 384, 7, (32, 8)),  # odd outputs, 8-bit
    ((1, 1), 5, 2, 128, 33, (None, None)),  # unquantized (float32 only on the CPU: gather_mm)
    ((3,), 5, 2, 256, 11, (64, 4)),  # several tokens: Metal and the reference only
]


def _switch(experts, d, i, quant, dtype, seed):
    """mlx-lm's SwitchLinear (bias=True) of `experts` x (d, i), random, quantized as `quant`."""
    keys = mx.random.split(mx.random.key(seed), 2)
    lin = SwitchLinear(i, d, experts, bias=True)
    lin.weight = 0.05 * mx.random.normal(lin.weight.shape, key=keys[0])
    lin.bias = 0.5 * mx.random.normal(lin.bias.shape, key=keys[1])
    gs, bits = quant
    if gs is not None:
        q = QuantizedSwitchLinear(i, d, experts, bias=True, group_size=gs, bits=bits)
        q.weight, q.scales, q.biases = mx.quantize(lin.weight, group_size=gs, bits=bits)
        q.bias = lin.bias
        lin = q
    lin.set_dtype(dtype)
    return lin


def _case(lead, experts, k, i, d, quant, dtype, seed=0):
    keys = mx.random.split(mx.random.key(seed), 4)
    proj = _switch(experts, d, i, quant, dtype, seed + 1)
    h = mx.random.normal((*lead, k, i), key=keys[0]).astype(dtype)
    inds = mx.random.randint(0, experts, (*lead, k), key=keys[1]).astype(mx.uint32)
    scores = mx.softmax(mx.random.normal((*lead, k), key=keys[2]), axis=-1, precise=True).astype(dtype)
    resid = mx.random.normal((*lead, d), key=keys[3]).astype(dtype)
    (w, s, b), packing = weights_of(proj)
    args = (h, inds, scores, w, s, b, resid, None, None, None, None, proj.bias)
    return proj, args, packing


def _mlx_lm(proj, h, inds, scores, resid):
    """gpt-oss's MLPBlock from its experts' activations on, and the decoder layer's residual
    add: mlx-lm's ops in mlx-lm's order."""
    y = proj(mx.expand_dims(h, -2), inds).squeeze(-2)
    return resid + (y * mx.expand_dims(scores, axis=-1)).sum(axis=-2)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_mlx_lms_switch_linear_with_its_bias(case, dtype):
    if case[5] == (None, None) and dtype != mx.float32:
        pytest.skip("MLX's CPU gather_mm runs only float32")
    proj, args, packing = _case(*case, dtype, seed=case[3] + case[4])
    h, inds, scores, *_, resid, _, _, _, _, _ = args
    want = _mlx_lm(proj, h, inds, scores, resid)
    got = reference(*args, **packing)
    assert got.dtype == want.dtype == dtype
    assert mx.array_equal(got, want).item()
    # and the biases matter: without them the output differs
    assert not mx.array_equal(reference(*args[:11], **packing), want).item()


def test_launch_takes_biases_of_the_experts_shape_only():
    _, args, packing = _case((1, 1), 8, 4, 256, 40, (64, 4), mx.bfloat16)
    assert not isinstance(launch("cuda", *args, **packing), Skip)
    assert dict(launch("cuda", *args, **packing).template)["EBIAS"]
    assert not dict(launch("cuda", *args[:11], **packing).template)["EBIAS"]
    wrong = (*args[:11], args[11][:, :-1])
    assert "expert biases (8, 39)" in launch("cuda", *wrong, **packing).reason
    other = (*args[:11], args[11].astype(mx.float16))
    assert "expert biases (8, 40) mlx.core.float16" in launch("cuda", *other, **packing).reason
    h, _, _, w, s, b, resid = args[:7]
    dense = (h[..., 0, :], None, None, w[0], s[0], b[0], resid, None, None, None, None, args[11])
    assert launch("cuda", *dense, **packing).reason == "the dense variant takes no expert biases"


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, case, dtype):
    if case[5] == (None, None) and dtype != mx.float32:
        pytest.skip("MLX's CPU gather_mm (the reference) runs only float32")
    _, args, packing = _case(*case, dtype, seed=case[3] + case[4])
    got = metal_emu.run(moe_down, *args, workdir=tmp_path_factory.getbasetemp(), **packing)  # poisoned NaN
    want, bar = close_bar(reference, reference_f32, args, packing, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    assert mx.abs(got.astype(mx.float32) - want).max().item() <= bar


CUDA_CASES = [c for c in CASES if c[0] != (3,)] + [
    ((1, 1), 32, 4, 2880, 2880, (64, 4)),  # gpt-oss-20b's experts at affine4
    ((1, 1), 32, 4, 2880, 2880, (None, None)),  # and unquantized
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_is_bitwise_mlx_lm(case, dtype):
    proj, args, packing = _case(*case, dtype, seed=case[3] + case[4])
    got = moe_down.run_kernel("cuda", *args, init_value=float("nan"), **packing)  # poisoned
    assert not isinstance(got, Skip), got
    h, inds, scores, *_, resid, _, _, _, _, _ = args
    want = _mlx_lm(proj, h, inds, scores, resid)
    assert got.dtype == dtype and got.shape == want.shape
    assert mx.array_equal(got, want).item(), mx.abs(got.astype(mx.float32) - want).max().item()
