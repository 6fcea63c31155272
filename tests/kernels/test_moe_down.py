"""moe_down: the routed down projections, routing weights, the shared expert's down projection
and the residual add in one launch (and the dense layer's down + residual add).

On CUDA bitwise stock (qmv's / gemv's arithmetic for the dots, moe_combine's order for the sum,
MLX's roundings for the adds) where stock runs its matvecs: fewer than 8 expert rows, one token
for a dense down projection. The Metal body is `close`: held to a float32 reference with
stock's own error as the bar. The references, with moe_gate_up's, are mlx-lm's own modules'
output: the MoE half of a Glm4MoeLiteDecoderLayer, `h + mlp(post_attention_layernorm(h))`."""

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.glm4_moe_lite import Glm4MoeLiteMLP, Glm4MoeLiteMoE, ModelArgs

from zmlx.kernels import metal_emu
from zmlx.kernels.core import KernelDef, Launch, Skip
from zmlx.kernels.moe_down import launch, moe_down, reference, reference_f32
from zmlx.kernels.moe_gate_up import moe_gate_up
from zmlx.kernels.moe_mlp import moe_mlp, quantized_experts
from zmlx.kernels.quant import weights_of
from zmlx.kernels.swiglu_mlp import quantized_linear, swiglu_mlp

# (tokens shape, experts (0: the dense variant), k, expert width I, shared width Is (None: no
#  shared expert), outputs D, (group, bits), shared (group, bits))
CASES = [
    ((1, 1), 8, 4, 256, 512, 40, (64, 4), (64, 4)),  # GLM-4.7-Flash's kind of call, small
    ((1, 1), 6, 3, 384, 128, 7, (128, 4), (32, 8)),  # odd outputs, a remainder tile, mixed packing
    ((2,), 5, 2, 256, None, 9, (32, 8), None),  # no shared expert
    ((1,), 4, 1, 128, 192, 16, (64, 8), (None, None)),  # unquantized shared expert
    ((1, 1), 8, 4, 256, 256, 40, (None, None), (None, None)),  # unquantized
    ((1, 1), 0, 0, 384, None, 33, (128, 4), None),  # dense: the first layer's down + residual
    ((1,), 0, 0, 192, None, 9, (None, None), None),  # dense unquantized, 2 per lane
    ((3,), 5, 2, 256, 320, 11, (64, 4), (64, 8)),  # several tokens: Metal only (CUDA stock leaves qmv)
]


def _inputs(lead, experts, k, i, si, d, quant, squant, dtype, seed=0):
    gs, bits = quant
    kw = dict(group_size=gs, bits=bits)
    resid = mx.random.normal((*lead, d), key=mx.random.key(seed)).astype(dtype)
    if experts == 0:
        h = mx.random.normal((*lead, i), key=mx.random.key(seed + 1)).astype(dtype)
        w = quantized_linear(d, i, group_size=gs, bits=bits, dtype=dtype, seed=seed + 2)
        return (h, None, None, *w, resid), kw
    h = mx.random.normal((*lead, k, i), key=mx.random.key(seed + 1)).astype(dtype)
    inds = mx.random.randint(0, experts, (*lead, k), key=mx.random.key(seed + 2)).astype(mx.uint32)
    scores = mx.random.uniform(shape=(*lead, k), key=mx.random.key(seed + 3)) * 1.8
    w = quantized_experts(experts, d, i, group_size=gs, bits=bits, dtype=dtype, seed=seed + 4)
    if si is None:
        return (h, inds, scores, *w, resid), kw
    hs = mx.random.normal((*lead, si), key=mx.random.key(seed + 5)).astype(dtype)
    sw = quantized_linear(d, si, group_size=squant[0], bits=squant[1], dtype=dtype, seed=seed + 6)
    return (h, inds, scores, *w, resid, hs, *sw), dict(kw, shared_group_size=squant[0], shared_bits=squant[1])


def _block(kind, dtype, quant, squant, *, d=256, i=128, experts=8, k=4, seed=0):
    """mlx-lm's MLP of a decoder layer ("shared": Glm4MoeLiteMoE with a shared expert of 2 x I
    rows, "routed": without one, "dense": Glm4MoeLiteMLP), random, in dtype, quantized as
    asked (experts and dense layer: quant; the shared expert: squant)."""
    args = ModelArgs(
        hidden_size=d,
        intermediate_size=3 * i,
        moe_intermediate_size=i,
        n_shared_experts=2 if kind == "shared" else None,
        n_routed_experts=experts,
        num_experts_per_tok=k,
    )
    mx.random.seed(seed)
    block = Glm4MoeLiteMLP(args) if kind == "dense" else Glm4MoeLiteMoE(args)
    if kind != "dense":
        block.gate.weight = mx.random.normal((experts, d)) * d**-0.5
        block.gate.e_score_correction_bias = mx.random.uniform(shape=(experts,)) * 0.1
    block.set_dtype(dtype)

    def packing(path, m):
        gs, bits = squant if path.startswith("shared_experts") else quant
        return hasattr(m, "to_quantized") and bits is not None and dict(group_size=gs, bits=bits)

    nn.quantize(block, class_predicate=packing)
    return block


def _ours(block, h, xn, run):
    """The block's output through moe_gate_up (or moe_mlp / swiglu_mlp) and moe_down, each
    called as run(kernel, *args, **kw)."""
    if isinstance(block, Glm4MoeLiteMLP):
        (g, kw), (u, _), (dn, _) = (weights_of(p) for p in (block.gate_proj, block.up_proj, block.down_proj))
        return run(moe_down, run(swiglu_mlp, xn, *g, *u, **kw), None, None, *dn, h, **kw)
    inds, scores = block.gate(xn)
    sw = block.switch_mlp
    (g, kw), (u, _), (dn, _) = (weights_of(p) for p in (sw.gate_proj, sw.up_proj, sw.down_proj))
    if "shared_experts" not in block:
        return run(moe_down, run(moe_mlp, xn, inds, *g, *u, **kw), inds, scores, *dn, h, **kw)
    se = block.shared_experts
    (sg, skw), (su, _), (sd, _) = (weights_of(p) for p in (se.gate_proj, se.up_proj, se.down_proj))
    kw.update(shared_group_size=skw["group_size"], shared_bits=skw["bits"])
    hr, hs = run(moe_gate_up, xn, inds, *g, *u, *sg, *su, **kw)
    return run(moe_down, hr, inds, scores, *dn, h, hs, *sd, **kw)


def _stock_moe_half(block, dtype, lead, seed):
    """(h, xn, h + block(xn)): the MoE half of a Glm4MoeLiteDecoderLayer after the attention."""
    d = block.config.hidden_size
    norm = nn.RMSNorm(d, eps=1e-5)
    norm.weight = (1 + 0.1 * mx.random.normal((d,), key=mx.random.key(seed))).astype(dtype)
    x, r = (mx.random.normal((*lead, d), key=mx.random.key(seed + j)).astype(dtype) for j in (1, 2))
    h = x + r
    xn = norm(h)
    return h, xn, h + block(xn)


BLOCKS = [  # (kind, dtype, quant, shared quant)
    ("shared", mx.bfloat16, (64, 4), (64, 4)),
    ("shared", mx.bfloat16, (64, 4), (32, 8)),
    ("shared", mx.float16, (128, 8), (None, None)),
    ("routed", mx.bfloat16, (32, 4), None),
    ("dense", mx.bfloat16, (64, 4), None),
    ("dense", mx.float16, (None, None), None),
    ("shared", mx.float32, (None, None), (None, None)),  # MLX's CPU gather_mm runs only float32
]


@pytest.mark.parametrize("lead", [(1, 1), (1, 3)])
@pytest.mark.parametrize("kind,dtype,quant,squant", BLOCKS)
def test_references_are_mlx_lm_decoder_layers_moe_half(kind, dtype, quant, squant, lead):
    block = _block(kind, dtype, quant, squant, seed=7)
    h, xn, want = _stock_moe_half(block, dtype, lead, seed=8)
    got = _ours(block, h, xn, lambda k, *a, **kw: k.reference(*a, **kw))
    assert got.dtype == want.dtype == dtype
    assert mx.array_equal(got, want).item()


def test_launch_says_why_it_takes_the_reference():
    args, kw = _inputs(*CASES[0], mx.bfloat16)
    assert "4/8-bit" in launch("cuda", *args, **{**kw, "bits": 2}).reason
    assert launch("cuda", *args, **{**kw, "shared_bits": 2}).reason.startswith("shared expert: affine 2-bit")
    assert "both or neither" in launch("cuda", args[0], args[1], None, *args[3:], **kw).reason
    in_t = launch("cuda", *args[:2], args[2].astype(mx.bfloat16), *args[3:], **kw)  # a softmax router's
    assert (
        dict(in_t.template)["A"] == mx.bfloat16
        and dict(launch("cuda", *args, **kw).template)["A"] == mx.float32
    )
    f16 = args[2].astype(mx.float16)
    assert "not float32 or h's dtype" in launch("cuda", *args[:2], f16, *args[3:], **kw).reason
    assert "residual" in launch("cuda", *args[:6], args[6][..., :3], *args[7:], **kw).reason
    assert "without its down weights" in launch("cuda", *args[:8], **kw).reason
    assert (
        "shared expert input" in launch("cuda", *args[:7], args[7].astype(mx.float16), *args[8:], **kw).reason
    )
    short = quantized_linear(24, 512, group_size=64, bits=4, dtype=mx.bfloat16, seed=1)  # 24 outputs, not 40
    assert "shared expert: weights" in launch("cuda", *args[:8], *short, **kw).reason
    spec = launch("cuda", *args, **kw)
    assert spec.grid == (40 * 32, 1, 1) and spec.output_shapes == [(1, 1, 40)]
    dense, dkw = _inputs(*CASES[5], mx.bfloat16)
    assert dict(launch("cuda", *dense, **dkw).template)["DENSE"]
    assert "no shared expert" in launch("cuda", *dense, args[7], *args[8:], **dkw).reason
    assert "down: weights" in launch("cuda", dense[0], None, None, *args[3:7], **dkw).reason


def test_cuda_takes_only_stock_matvec_calls():
    """On CUDA the kernel serves what stock runs through qmv/gemv: < 8 expert rows, and one
    token for a dense down projection (shared or the dense layer's: qmv up to 1 row on sm90)."""
    args, kw = _inputs((2, 1), 8, 4, 256, 256, 40, (64, 4), (64, 4), mx.bfloat16)  # 8 expert rows
    assert "tiled qmm" in launch("cuda", *args, **kw).reason
    args, kw = _inputs((2,), 8, 2, 256, 256, 40, (64, 4), (64, 4), mx.bfloat16)  # 4 expert rows, 2 tokens
    assert launch("cuda", *args, **kw).reason.startswith("shared expert: 2 rows: stock uses a tiled qmm")
    assert isinstance(launch("metal", *args, **kw), Launch)  # Metal is close anyway
    routed, kw = _inputs((2,), 8, 2, 256, None, 40, (64, 4), None, mx.bfloat16)  # no shared: 4 rows fit
    assert isinstance(launch("cuda", *routed, **kw), Launch)
    dense, kw = _inputs((2,), 0, 0, 256, None, 40, (None, None), None, mx.bfloat16)
    assert launch("cuda", *dense, **kw).reason.startswith("down: 2 rows: stock leaves its gemv")
    args, kw = _inputs(*CASES[0], mx.bfloat16)
    f16 = [a.astype(mx.float16) if i in (9, 10) else a for i, a in enumerate(args)]  # shared scales, biases
    assert "shared expert: scales/biases not in the activations' dtype" in launch("cuda", *f16, **kw).reason


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_its_example_passes_the_self_check_on_emulated_metal(monkeypatch, tmp_path):
    """What a Mac runs before the first use: the kernel on its example() against the reference."""
    run = lambda self, backend, *a, **kw: metal_emu.run(self, *a, workdir=tmp_path, **kw)  # noqa: E731
    monkeypatch.setattr(KernelDef, "run_kernel", run)
    assert dataclasses.replace(moe_down, _status={}).plan("metal") == ("metal", "kernel", "")


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, case, dtype):
    if case[1] and case[6] == (None, None) and dtype != mx.float32:
        pytest.skip("MLX's CPU gather_mm (the reference) runs only float32")
    args, kw = _inputs(*case, dtype, seed=case[3] + case[5])
    got = metal_emu.run(moe_down, *args, workdir=tmp_path_factory.getbasetemp(), **kw)  # poisoned NaN
    want, bar = close_bar(reference, reference_f32, args, kw, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    assert mx.abs(got.astype(mx.float32) - want).max().item() <= bar


CUDA_CASES = [c for c in CASES if c[0] != (3,)] + [
    ((1, 1), 64, 4, 1536, 1536, 2048, (64, 4), (64, 4)),  # GLM-4.7-Flash
    ((1, 1), 64, 4, 1536, 1536, 2048, (None, None), (None, None)),  # and in bf16
    ((1, 1), 0, 0, 10240, None, 2048, (64, 4), None),  # its dense first layer
    ((1,), 9, 1, 1536, 1536, 24, (32, 4), (128, 8)),  # remainder tile
    ((1,), 8, 4, 2048, None, 33, (128, 8), None),
    ((1, 1), 8, 4, 352, 352, 40, (32, 8), (None, None)),  # gemv: 1 per lane
    ((1, 1), 8, 4, 256, 256, 123, (64, 4), (64, 4)),  # D % 4 != 0: stock's lane-tree sum
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize(
    "scores_in_t", [False, True], ids=["scores_f32", "scores_in_t"]
)  # a gate module's float32, a softmax router's T
def test_cuda_kernel_is_bitwise_stock(case, dtype, scores_in_t):
    args, kw = _inputs(*case, dtype, seed=case[3] + case[5])
    if scores_in_t and args[2] is not None:
        args = (*args[:2], args[2].astype(dtype), *args[3:])
    got = moe_down.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    want = reference(*args, **kw)
    assert got.dtype == dtype and got.shape == want.shape
    assert mx.array_equal(got, want).item(), mx.abs(got.astype(mx.float32) - want).max().item()


def _kernel(k, *args, **kw):
    out = k.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    assert not isinstance(out, Skip), out
    return out


@pytest.mark.cuda
@pytest.mark.parametrize(
    "quant,squant", [((64, 4), (64, 4)), ((32, 8), (128, 4)), ((None, None), (None, None))]
)
@pytest.mark.parametrize("kind", ["shared", "routed", "dense"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_cuda_kernels_are_bitwise_mlx_lm_decoder_layers_moe_half(kind, dtype, quant, squant):
    """The stock router's inds and scores, then moe_gate_up (moe_mlp without a shared expert,
    swiglu_mlp for the dense layer) and moe_down on the GPU: bitwise `h + mlp(norm(h))`."""
    block = _block(kind, dtype, quant, squant, d=384, i=192, experts=9, seed=3)
    h, xn, want = _stock_moe_half(block, dtype, (1, 1), seed=4)
    got = _ours(block, h, xn, _kernel)
    assert got.dtype == dtype and mx.array_equal(got, want).item()
