"""mxfp4 weights in the expert kernels moe_block launches (moe_mlp, downproj_combine,
swiglu_mlp, moe_gate_up, moe_down): e2m1 values, one uint8 e8m0 scale per 32, no biases.

On CUDA the dot follows MLX's qmv as sm80/sm90 run mxfp4 (qmv.cu: the value times its
scale in T, fma into T accumulators): bitwise stock below 8 rows, gathered or dense (no
sm90 qmm takes mxfp4). The references are mlx-lm's modules quantized with
nn.quantize(mode="mxfp4") (MLX's CPU runs mxfp4 gather_qmm and quantized_matmul). The
Metal body is `close`: held to the float32 reference with stock's own error as the bar."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.activations import swiglu
from mlx_lm.models.glm4_moe_lite import Glm4MoeLiteMLP, Glm4MoeLiteMoE, ModelArgs
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from zmlx.kernels import downproj_combine, metal_emu, moe_down, moe_gate_up, moe_mlp, swiglu_mlp
from zmlx.kernels.core import KernelDef, Launch, Skip, device_code
from zmlx.kernels.moe_mlp import quantized_experts
from zmlx.kernels.quant import (
    MODES,
    MXFP4_GATHERED_MAX_COLS,
    layout_reason,
    linear_reason,
    regime_reason,
    switch_linear_reason,
    weights_of,
    weights_reason,
)
from zmlx.kernels.swiglu_mlp import quantized_linear

MX = dict(group_size=32, bits=4, mode="mxfp4")
A4, A8, BF = dict(group_size=32, bits=4), dict(group_size=32, bits=8), dict(group_size=None, bits=None)
MODULES = {
    "moe_mlp": moe_mlp,
    "downproj_combine": downproj_combine,
    "swiglu_mlp": swiglu_mlp,
    "moe_gate_up": moe_gate_up,
    "moe_down": moe_down,
}


def _shared(packing: dict) -> dict:
    return {f"shared_{k}": v for k, v in packing.items()}


def _inputs(name, lead, d, i, dtype, *, experts=6, k=4, p=MX, sp=None, seed=0):
    """(args, kwargs) of kernel `name`: D-wide inputs to I rows (the down kernels: I-wide
    inputs to D outputs), experts packed as p, the shared expert (or none) as sp."""
    key = lambda j: mx.random.key(seed + j)  # noqa: E731
    x = mx.random.normal((*lead, d), key=key(0)).astype(dtype)
    inds = mx.random.randint(0, experts, (*lead, k), key=key(1)).astype(mx.uint32)
    scores = mx.random.uniform(shape=(*lead, k), key=key(2)) * 1.8
    if name == "swiglu_mlp":
        g, u = (quantized_linear(i, d, dtype=dtype, seed=seed + j, **p) for j in (3, 4))
        return (x, *g, *u), p
    if name in ("moe_mlp", "moe_gate_up"):
        g, u = (quantized_experts(experts, i, d, dtype=dtype, seed=seed + j, **p) for j in (3, 4))
        if name == "moe_mlp":
            return (x, inds, *g, *u), p
        sg, su = (quantized_linear(2 * i, d, dtype=dtype, seed=seed + j, **sp) for j in (5, 6))
        return (x, inds, *g, *u, *sg, *su), {**p, **_shared(sp)}
    resid = x
    if k == 0:  # moe_down's dense variant
        h = mx.random.normal((*lead, i), key=key(7)).astype(dtype)
        return (h, None, None, *quantized_linear(d, i, dtype=dtype, seed=seed + 9, **p), resid), p
    h = mx.random.normal((*lead, k, i), key=key(7)).astype(dtype)
    w = quantized_experts(experts, d, i, dtype=dtype, seed=seed + 8, **p)
    if name == "downproj_combine":
        return (h, inds, scores, *w, resid if sp else None), p
    if sp is None:
        return (h, inds, scores, *w, resid), p
    hs = mx.random.normal((*lead, 2 * i), key=key(10)).astype(dtype)
    sw = quantized_linear(d, 2 * i, dtype=dtype, seed=seed + 11, **sp)
    return (h, inds, scores, *w, resid, hs, *sw), {**p, **_shared(sp)}


CASES = [  # (kernel, tokens, D, I, experts' packing, the shared expert's; experts k)
    ("moe_mlp", (1, 1), 288, 9, MX, None, 4),  # 288: one remainder tile, 18 of 32 lanes
    ("moe_mlp", (2,), 544, 13, MX, None, 3),  # a full tile and a remainder of 2 lanes
    ("downproj_combine", (1, 1), 33, 288, MX, MX, 4),  # odd outputs: stock's lane-tree sum
    ("swiglu_mlp", (1,), 544, 7, MX, None, 1),
    ("moe_gate_up", (1, 1), 288, 9, MX, A8, 4),  # the shared expert packed otherwise
    ("moe_gate_up", (1,), 544, 7, A4, MX, 2),
    ("moe_down", (1, 1), 40, 288, MX, MX, 4),
    ("moe_down", (1, 1), 13, 544, MX, A4, 4),
    ("moe_down", (1,), 9, 288, MX, None, 3),  # no shared expert
    ("moe_down", (1, 1), 33, 544, MX, None, 0),  # the dense layer's down + residual
]


def _tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _case_inputs(case, dtype):
    name, lead, d, i, p, sp, k = case
    return _inputs(name, lead, d, i, dtype, k=k, p=p, sp=sp, seed=d + i)


# ----------------------------------------------------------------- layout and regime


def test_mxfp4_layout_is_4_bit_group_32_and_other_modes_are_named():
    assert layout_reason(4, 32, "mxfp4") is None
    assert layout_reason(8, 32, "mxfp4") == "mxfp4 8-bit, group 32"
    assert layout_reason(4, 16, "nvfp4") == "nvfp4 quantization"
    assert layout_reason(4, 64) is None  # affine as before


def test_mxfp4_projections_pass_only_where_the_caller_reads_them():
    sw = QuantizedSwitchLinear(64, 8, 3, bias=False, **MX)
    lin = nn.QuantizedLinear(64, 8, bias=False, **MX)
    assert switch_linear_reason("up", sw) == "up is mxfp4-quantized (affine only)"  # the module patterns
    assert linear_reason("up", lin) == "up is mxfp4-quantized (affine only)"
    assert switch_linear_reason("up", sw, MODES) is None and linear_reason("up", lin, MODES) is None
    mxfp8 = nn.QuantizedLinear(64, 8, bias=False, group_size=32, bits=8, mode="mxfp8")
    assert linear_reason("up", mxfp8, MODES) == "up is mxfp8-quantized (affine or mxfp4 only)"


def test_weights_of_names_the_mode_only_when_not_affine():
    (w, s, b), packing = weights_of(QuantizedSwitchLinear(64, 8, 3, bias=False, **MX))
    assert packing == MX and b is None and s.dtype == mx.uint8 and w.dtype == mx.uint32
    # what the affine-only kernels (attention) always got: no mode
    assert weights_of(nn.QuantizedLinear(64, 8, bias=False))[1] == dict(group_size=64, bits=4)
    assert weights_of(nn.Linear(64, 8, bias=False))[1] == BF


def test_weights_reason_reads_the_mxfp4_layout():
    w, s, _ = quantized_experts(3, 8, 64, dtype=mx.bfloat16, seed=1, **MX)
    kw = dict(cols=64, group_size=32, bits=4, dtype=mx.bfloat16)
    assert weights_reason(w, s, None, mode="mxfp4", **kw) is None
    assert weights_reason(w, s, s, mode="mxfp4", **kw) == "mxfp4 quantization with biases"
    assert "e8m0 scales are uint8" in weights_reason(w, s.astype(mx.bfloat16), None, mode="mxfp4", **kw)
    assert weights_reason(w, s, None, **kw) == "affine quantization without biases"  # mode not passed on
    assert "for rows of 96" in weights_reason(w, s, None, mode="mxfp4", **{**kw, "cols": 96})
    assert "scales (3, 8, 1)" in weights_reason(w, s[..., :1], None, mode="mxfp4", **kw)


def test_cuda_regime_for_mxfp4_is_qmv_below_8_rows_dense_too():
    """No sm90 qmm takes mxfp4: a dense matmul stays in qmv below 8 rows, as a gathered one."""
    w, s, _ = quantized_linear(8, 64, dtype=mx.bfloat16, seed=1, **MX)
    assert regime_reason("cuda", 7, mx.bfloat16, s, None, w, qmv_rows=2, mode="mxfp4") is None
    assert "tiled qmm from 8 rows" in regime_reason("cuda", 8, mx.bfloat16, s, None, w, mode="mxfp4")
    args, kw = _inputs("swiglu_mlp", (7,), 288, 9, mx.bfloat16)
    assert isinstance(swiglu_mlp.launch("cuda", *args, **kw), Launch)
    args, kw = _inputs("swiglu_mlp", (2,), 288, 9, mx.bfloat16, p=A4)
    assert "tiled qmm from 2 rows" in swiglu_mlp.launch("cuda", *args, **kw).reason  # affine: sm90 qmm
    args, kw = _inputs("moe_down", (7,), 40, 288, mx.bfloat16, k=0)
    assert isinstance(moe_down.launch("cuda", *args, **kw), Launch)
    args, kw = _inputs("moe_mlp", (2, 1), 288, 9, mx.bfloat16, k=4)  # 8 expert rows
    assert "tiled qmm from 8 rows" in moe_mlp.launch("cuda", *args, **kw).reason
    assert isinstance(moe_mlp.launch("metal", *args, **kw), Launch)  # Metal is close anyway


def test_launches_take_mxfp4_with_the_weights_as_the_biases_placeholder():
    """The dot picks its mxfp4 overload from the uint8 scales; the biases' placeholder must
    be another type (the packed weights), or Metal's affine overload would match too."""
    args, kw = _inputs("moe_mlp", (1, 1), 288, 9, mx.bfloat16)
    spec = moe_mlp.launch("cuda", *args, **kw)
    assert dict(spec.template)["GS"] == 32 and dict(spec.template)["BITS"] == 4
    assert spec.inputs[3].dtype == mx.uint8 and spec.inputs[4] is args[2] and spec.inputs[7] is args[5]
    args, kw = _inputs("moe_down", (1, 1), 40, 288, mx.bfloat16, sp=MX)
    spec = moe_down.launch("cuda", *args, **kw)
    assert spec.inputs[5] is args[3] and spec.inputs[10] is args[8]
    assert dict(spec.template)["SGS"] == 32


def test_launches_say_why_they_take_the_reference():
    args, kw = _inputs("moe_mlp", (1, 1), 288, 9, mx.bfloat16)
    assert moe_mlp.launch("cuda", *args, group_size=32, bits=4).reason == "affine quantization without biases"
    assert moe_mlp.launch("cuda", *args, **{**kw, "bits": 8}).reason == "mxfp4 8-bit, group 32"
    args, kw = _inputs("moe_gate_up", (1, 1), 288, 9, mx.bfloat16, sp=MX)
    with_biases = (*args[:10], args[9], *args[11:])  # the shared gate "with biases"
    assert (
        moe_gate_up.launch("cuda", *with_biases, **kw).reason
        == "shared expert: mxfp4 quantization with biases"
    )
    args, kw = _inputs("moe_down", (1, 1), 40, 288, mx.bfloat16, sp=MX)
    assert moe_down.launch("cuda", *args, **{**kw, "shared_mode": "affine"}).reason.startswith(
        "shared expert: affine quantization without biases"
    )


# ----------------------------------------------------------------- references are mlx-lm


def test_moe_mlp_and_swiglu_mlp_references_are_mlx_lm_mxfp4_modules():
    d, i = 288, 9
    gate, up = (QuantizedSwitchLinear(d, i, 6, bias=False, **MX) for _ in range(2))
    x = mx.random.normal((1, 1, d), key=mx.random.key(3)).astype(mx.bfloat16)
    inds = mx.array([[[1, 3, 0, 5]]], dtype=mx.uint32)
    xe = mx.expand_dims(x, (-2, -3))
    want = swiglu(gate(xe, inds), up(xe, inds)).squeeze(-2)
    (g, packing), (u, _) = weights_of(gate), weights_of(up)
    assert mx.array_equal(moe_mlp.reference(x, inds, *g, *u, **packing), want).item()
    sg, su = (nn.QuantizedLinear(d, i, bias=False, **MX) for _ in range(2))
    (g, packing), (u, _) = weights_of(sg), weights_of(su)
    want = swiglu(sg(x), su(x))
    assert mx.array_equal(swiglu_mlp.reference(x, *g, *u, **packing), want).item()


def _block(kind, dtype, quant, squant, *, d=288, i=96, experts=8, k=4, seed=0):
    """mlx-lm's MLP of a decoder layer (Glm4MoeLiteMoE with or without a shared expert of
    2 x I rows, or Glm4MoeLiteMLP), random, in dtype, quantized with nn.quantize: the
    experts and dense layer as `quant`, the shared expert as `squant` (packing dicts)."""
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
        p = squant if path.startswith("shared_experts") else quant
        return hasattr(m, "to_quantized") and p["bits"] is not None and p

    nn.quantize(block, class_predicate=packing)
    return block


def _ours(block, h, xn, run):
    """h + block(xn) through the kernels moe_block launches, each as run(kernel, *args, **kw),
    with the packings weights_of reads (mode and all), as moe_block passes them."""
    if isinstance(block, Glm4MoeLiteMLP):
        (g, kw), (u, _), (dn, dkw) = map(weights_of, (block.gate_proj, block.up_proj, block.down_proj))
        return run(moe_down.moe_down, run(swiglu_mlp.swiglu_mlp, xn, *g, *u, **kw), None, None, *dn, h, **dkw)
    inds, scores = block.gate(xn)
    sw = block.switch_mlp
    (g, kw), (u, _), (dn, dkw) = map(weights_of, (sw.gate_proj, sw.up_proj, sw.down_proj))
    if "shared_experts" not in block:
        hr = run(moe_mlp.moe_mlp, xn, inds, *g, *u, **kw)
        return run(moe_down.moe_down, hr, inds, scores, *dn, h, **dkw)
    se = block.shared_experts
    (sg, skw), (su, _), (sd, sdkw) = map(weights_of, (se.gate_proj, se.up_proj, se.down_proj))
    hr, hs = run(moe_gate_up.moe_gate_up, xn, inds, *g, *u, *sg, *su, **kw, **_shared(skw))
    return run(moe_down.moe_down, hr, inds, scores, *dn, h, hs, *sd, **dkw, **_shared(sdkw))


def _stock_moe_half(block, dtype, lead, seed):
    """(h, xn, h + block(xn)): the MoE half of a Glm4MoeLiteDecoderLayer after the attention."""
    d = block.config.hidden_size
    norm = nn.RMSNorm(d, eps=1e-5)
    norm.weight = (1 + 0.1 * mx.random.normal((d,), key=mx.random.key(seed))).astype(dtype)
    x, r = (mx.random.normal((*lead, d), key=mx.random.key(seed + j)).astype(dtype) for j in (1, 2))
    h = x + r
    xn = norm(h)
    return h, xn, h + block(xn)


BLOCKS = [  # (kind, dtype, experts' packing, the shared expert's)
    ("shared", mx.bfloat16, MX, MX),
    ("shared", mx.float16, MX, A8),
    ("shared", mx.bfloat16, A4, MX),
    ("routed", mx.float32, MX, None),
    ("dense", mx.bfloat16, MX, None),
]


@pytest.mark.parametrize("lead", [(1, 1), (1, 3)])
@pytest.mark.parametrize("kind,dtype,quant,squant", BLOCKS)
def test_references_are_mlx_lm_decoder_layers_moe_half(kind, dtype, quant, squant, lead):
    block = _block(kind, dtype, quant, squant, seed=7)
    h, xn, want = _stock_moe_half(block, dtype, lead, seed=8)
    got = _ours(block, h, xn, lambda k, *a, **kw: k.reference(*a, **kw))
    assert got.dtype == want.dtype == dtype
    assert mx.array_equal(got, want).item()


# ----------------------------------------------------------------- device bodies


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_every_e2m1_code_and_e8m0_scale_converts_as_mlx_dequantizes(tmp_path):
    """csrc/quant.h's conversions (shared by the CUDA and Metal dots) against mx.dequantize:
    each of the 16 codes at each finite scale (255 is NaN on CUDA, inf on MLX's CPU)."""
    scales = mx.arange(255, dtype=mx.uint8)
    probe = KernelDef(
        name="mxfp4_codes",
        reference=None,
        body="out[zmlx_tid] = zmlx_e2m1(zmlx_tid % 16u) * zmlx_e8m0(uint(scales[zmlx_tid / 16u]));",
        header=device_code("quant.h"),
        input_names=("scales",),
        output_names=("out",),
        launch=lambda backend, s: Launch(
            inputs=[s],
            template=[],
            grid=(16 * s.size, 1, 1),
            threadgroup=(16, 1, 1),
            output_shapes=[(s.size, 16)],
            output_dtypes=[mx.float32],
        ),
    )
    got = metal_emu.run(probe, scales, workdir=tmp_path)
    words = mx.array([0x76543210, 0xFEDCBA98], dtype=mx.uint32)  # codes 0..15, lowest nibble first
    w = mx.broadcast_to(mx.tile(words, 2), (255, 4))  # 32 values: codes 0..15 twice
    want = mx.dequantize(w, scales[:, None], None, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
    assert mx.array_equal(got, want[:, :16]).item()
    signs = (got[127].view(mx.uint32) >> 31).astype(mx.bool_)  # -0.0 for code 8, as cutlass converts it
    assert mx.array_equal(signs, mx.arange(16) >= 8).item()


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{j}" for j, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, case, dtype):
    module = MODULES[case[0]]
    args, kw = _case_inputs(case, dtype)
    got = _tuple(metal_emu.run(getattr(module, case[0]), *args, workdir=tmp_path_factory.getbasetemp(), **kw))
    for j, out in enumerate(got):  # moe_gate_up: two outputs, each against its own bar
        want, bar = close_bar(
            lambda *a, **k: _tuple(module.reference(*a, **k))[j],
            lambda *a, **k: _tuple(module.reference_f32(*a, **k))[j],
            args,
            kw,
            dtype,
        )
        assert out.dtype == dtype and out.shape == want.shape  # poisoned NaN: an unwritten one fails
        assert mx.abs(out.astype(mx.float32) - want).max().item() <= bar, j


CUDA_CASES = CASES + [
    ("moe_mlp", (1, 1), 2048, 1536, MX, None, 4),  # GLM-4.7-Flash's experts
    ("moe_gate_up", (1, 1), 2048, 1536, MX, MX, 4),
    ("moe_down", (1, 1), 2048, 1536, MX, MX, 4),
    ("moe_down", (1, 1), 123, 1536, MX, MX, 4),  # D % 4 != 0
    ("swiglu_mlp", (1, 1), 2048, 10240, MX, None, 1),  # its dense first layer
    ("moe_down", (1, 1), 2048, 10240, MX, None, 0),
    ("swiglu_mlp", (7,), 288, 33, MX, None, 1),  # 7 tokens: dense mxfp4 stays in qmv
    ("moe_mlp", (7,), 544, 33, MX, None, 1),  # 7 expert rows
]


def _gathered_wide(case) -> bool:
    """Whether the case gathers mxfp4 expert rows wider than MXFP4_GATHERED_MAX_COLS (the
    gate/up rows of width d, the down rows of width i): those take the reference on CUDA."""
    name, _, d, i, p, _, k = case
    width = d if name in ("moe_mlp", "moe_gate_up") else i
    gathered = k > 0 and name != "swiglu_mlp"
    return gathered and p.get("mode") == "mxfp4" and width > MXFP4_GATHERED_MAX_COLS


def test_with_fp_order_off_wide_gathered_mxfp4_rows_take_the_reference_on_cuda_and_say_why(monkeypatch):
    """quant.MXFP4_FP_ORDER off (as before its cuda tests ran): the wide gathered mxfp4 cases
    skip on CUDA with the reason, every other case launches."""
    from zmlx.kernels import quant

    monkeypatch.setattr(quant, "MXFP4_FP_ORDER", False)
    wide = [c for c in CUDA_CASES if _gathered_wide(c)]
    assert {c[0] for c in wide} == {"moe_mlp", "moe_gate_up", "moe_down"}  # the rule has cases
    for case in wide:
        args, kw = _case_inputs(case, mx.bfloat16)
        got = getattr(MODULES[case[0]], case[0]).launch("cuda", *args, **kw)
        assert isinstance(got, Skip) and "gathered mxfp4 rows of" in got.reason, (case, got)
        assert not isinstance(getattr(MODULES[case[0]], case[0]).launch("metal", *args, **kw), Skip)
    for case in CUDA_CASES:
        if not _gathered_wide(case):
            args, kw = _case_inputs(case, mx.bfloat16)
            got = getattr(MODULES[case[0]], case[0]).launch("cuda", *args, **kw)
            assert not isinstance(got, Skip), (case, got)


def test_with_fp_order_on_wide_gathered_rows_launch_in_it_on_cuda_only(monkeypatch):
    """quant.MXFP4_FP_ORDER on: the wide gathered mxfp4 cases launch with FPQMV (fp_qmv's
    order) on CUDA, every other case and every Metal launch without it."""
    from zmlx.kernels import quant

    monkeypatch.setattr(quant, "MXFP4_FP_ORDER", True)
    for case in CUDA_CASES:
        args, kw = _case_inputs(case, mx.bfloat16)
        kernel = getattr(MODULES[case[0]], case[0])
        got = kernel.launch("cuda", *args, **kw)
        assert not isinstance(got, Skip), (case, got)
        assert dict(got.template)["FPQMV"] == _gathered_wide(case), case
        assert not dict(kernel.launch("metal", *args, **kw).template)["FPQMV"]


@pytest.mark.cuda
@pytest.mark.parametrize("case", [c for c in CUDA_CASES if _gathered_wide(c)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_cuda_fp_order_is_bitwise_stock(case, dtype, monkeypatch):
    """The wide gathered mxfp4 rows in fp_qmv's order (quant.MXFP4_FP_ORDER, off until this
    passes on a GPU): bitwise stock's gather_qmm, which runs fp_gather_qmv there."""
    from zmlx.kernels import quant

    monkeypatch.setattr(quant, "MXFP4_FP_ORDER", True)
    module = MODULES[case[0]]
    args, kw = _case_inputs(case, dtype)
    got = getattr(module, case[0]).run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    assert not isinstance(got, Skip), got
    want = module.reference(*args, **kw)
    for g, w in zip(_tuple(got), _tuple(want), strict=True):
        assert g.dtype == dtype and g.shape == w.shape
        assert mx.array_equal(g, w).item(), mx.abs(g.astype(mx.float32) - w).max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=[f"{c[0]}-{j}" for j, c in enumerate(CUDA_CASES)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_cuda_kernel_is_bitwise_stock(case, dtype):
    """Bitwise stock where the kernel takes the call; the wide gathered mxfp4 cases take the
    reference (stock's order there not known on MLX 0.32.4: MXFP4_GATHERED_MAX_COLS)."""
    module = MODULES[case[0]]
    args, kw = _case_inputs(case, dtype)
    got = getattr(module, case[0]).run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    if _gathered_wide(case):
        assert isinstance(got, Skip), got
        return
    assert not isinstance(got, Skip), got
    want = module.reference(*args, **kw)
    for g, w in zip(_tuple(got), _tuple(want), strict=True):
        assert g.dtype == dtype and g.shape == w.shape
        assert mx.array_equal(g, w).item(), mx.abs(g.astype(mx.float32) - w).max().item()


def _kernel(k, *args, **kw):
    out = k.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    assert not isinstance(out, Skip), out
    return out


@pytest.mark.cuda
@pytest.mark.parametrize(
    "kind,quant,squant", [("shared", MX, MX), ("shared", MX, A4), ("routed", MX, None), ("dense", MX, None)]
)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_cuda_kernels_are_bitwise_mlx_lm_decoder_layers_moe_half(kind, dtype, quant, squant):
    """The stock router's inds and scores, then the block's kernels on the GPU with mxfp4
    experts: bitwise `h + mlp(norm(h))`."""
    block = _block(kind, dtype, quant, squant, d=384, i=192, experts=9, seed=3)
    h, xn, want = _stock_moe_half(block, dtype, (1, 1), seed=4)
    got = _ours(block, h, xn, _kernel)
    assert got.dtype == dtype and mx.array_equal(got, want).item()
