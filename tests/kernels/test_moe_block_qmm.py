"""moe_block's launches 2 and 3 in qmm_sm80's order (quant.QMM_BLOCK, with QMM_ORDER).

From 8 (token, expert) rows (top-8 at decode: Qwen3-30B-A3B, GLM-4.5-Air, DeepSeek-V3) stock's
gather_qmm runs qmm_sm80 on affine weights whose outputs are a multiple of 128 and rows of
max(64, group) values. There moe_gate_up(_route) takes moe_mlp's QMM warps for its routed rows
(one warp per 8 outputs) and keeps the shared expert's warps in qmv's order (one token: stock's
qmv), and moe_down takes downproj_combine's QMM block (k warps per 8 outputs, a warp an expert)
with its own epilogue (the shared expert's down rows in qmv's order, the combine, the shared add
and the residual add as its qmv body does them). Both must be bitwise stock on CUDA. Without a
GPU: which calls take the variant (switch off: the old reasons, switch on: a Launch of the QMM
geometry; qmv rows unchanged), that moe_block now keeps such steps, and that every new
instantiation compiles with NVRTC."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.glm4_moe_lite import Glm4MoeLiteMoE, ModelArgs
from toolchain_marks import needs_nvrtc

from zmlx.kernels import core, cuda_check, moe_down, moe_gate_up, moe_mlp, quant
from zmlx.kernels.core import Launch, Skip
from zmlx.kernels.moe_mlp import quantized_experts
from zmlx.kernels.quant import weights_of
from zmlx.kernels.swiglu_mlp import quantized_linear
from zmlx.patch.layer import Routing
from zmlx.patch.patterns import moe_block

# moe_gate_up: (experts, k, I, shared Is, D, (group, bits), shared (group, bits)), one token
GATE_UP = [
    (32, 8, 768, 768, 2048, (64, 4), (64, 4)),  # Qwen3-30B-A3B's expert shapes (128 experts there)
    (16, 8, 1408, 1408, 4096, (64, 4), (64, 4)),  # GLM-4.5-Air's, its shared expert
    (12, 8, 256, 384, 512, (64, 8), (128, 8)),  # 8-bit
    (12, 8, 384, 200, 256, (128, 4), (None, None)),  # groups of 128, an unquantized shared expert
    (12, 8, 256, 96, 384, (32, 4), (32, 8)),  # groups of 32
]
# moe_down: (tokens, experts, k, I, D, (group, bits), shared (Is, group, bits) or None)
DOWN = [
    (1, 32, 8, 768, 2048, (64, 4), None),  # Qwen3-30B-A3B's (no shared expert)
    (1, 16, 8, 1408, 4096, (64, 4), (1408, 64, 4)),  # GLM-4.5-Air's
    (1, 12, 8, 256, 512, (64, 8), (384, 128, 8)),  # 8-bit
    (2, 16, 4, 1536, 2048, (64, 4), None),  # GLM-4.7-Flash's top-4, 2 tokens
    (3, 16, 4, 256, 384, (32, 4), None),  # 12 rows, groups of 32
    (1, 24, 12, 384, 256, (128, 4), (192, None, None)),  # 12 warps a block, unquantized shared
]
ROUTER = dict(routed_scaling_factor=2.5, norm_topk_prob=True, renorm_eps=1e-20)


def _gate_up(experts, k, i, i_s, d, packing, spacking, dtype, seed=0, route=False):
    (gs, bits), (sgs, sbits) = packing, spacking
    x = mx.random.normal((1, 1, d), key=mx.random.key(seed)).astype(dtype)
    g = quantized_experts(experts, i, d, group_size=gs, bits=bits, dtype=dtype, seed=seed + 2)
    u = quantized_experts(experts, i, d, group_size=gs, bits=bits, dtype=dtype, seed=seed + 3)
    sg = quantized_linear(i_s, d, group_size=sgs, bits=sbits, dtype=dtype, seed=seed + 4)
    su = quantized_linear(i_s, d, group_size=sgs, bits=sbits, dtype=dtype, seed=seed + 5)
    kw = dict(group_size=gs, bits=bits, shared_group_size=sgs, shared_bits=sbits)
    if route:  # the router's gates in x's dtype and a float32 bias
        gates = mx.random.normal((1, 1, experts), key=mx.random.key(seed + 6)).astype(dtype)
        bias = 0.1 * mx.random.normal((experts,), key=mx.random.key(seed + 7))
        return (x, gates, *g, *u, *sg, *su, bias), {**kw, **ROUTER, "top_k": k}
    inds = mx.random.permutation(experts, key=mx.random.key(seed + 1))[:k].astype(mx.uint32)
    return (x, inds.reshape(1, 1, k), *g, *u, *sg, *su), kw


def _down(n, experts, k, i, d, packing, shared, dtype, seed=0, scores_in_t=False):
    gs, bits = packing
    h = mx.random.normal((n, k, i), key=mx.random.key(seed)).astype(dtype)
    inds = mx.random.randint(0, experts, (n, k), key=mx.random.key(seed + 1)).astype(mx.uint32)
    scores = mx.random.uniform(shape=(n, k), key=mx.random.key(seed + 2)) * 1.8
    w = quantized_experts(experts, d, i, group_size=gs, bits=bits, dtype=dtype, seed=seed + 3)
    resid = mx.random.normal((n, d), key=mx.random.key(seed + 4)).astype(dtype)
    args = (h, inds, scores.astype(dtype) if scores_in_t else scores, *w, resid)
    kw = dict(group_size=gs, bits=bits)
    if shared is None:
        return args, kw
    i_s, sgs, sbits = shared
    hs = mx.random.normal((n, i_s), key=mx.random.key(seed + 5)).astype(dtype)
    sw = quantized_linear(d, i_s, group_size=sgs, bits=sbits, dtype=dtype, seed=seed + 6)
    return (*args, hs, *sw), dict(kw, shared_group_size=sgs, shared_bits=sbits)


def _kernel(route):
    return moe_gate_up.moe_gate_up_route if route else moe_gate_up.moe_gate_up


# ---------------------------------------------------------------- which calls, what geometry


@pytest.mark.parametrize("route", [False, True], ids=["inds", "route"])
def test_with_qmm_block_off_8_rows_skip_as_before(qmm_on, monkeypatch, route):
    monkeypatch.setattr(quant, "QMM_BLOCK", False)
    args, kw = _gate_up(*GATE_UP[0], mx.bfloat16, route=route)
    got = _kernel(route).launch("cuda", *args, **kw)
    assert got == Skip("8 expert rows: stock's qmm_sm80 (moe_block's kernels follow its qmv only)")
    args, kw = _down(*DOWN[1], mx.bfloat16)
    got = moe_down.launch("cuda", *args, **kw)
    assert got == Skip("8 expert rows: stock's qmm_sm80 (moe_block's kernels follow its qmv only)")
    monkeypatch.setattr(quant, "QMM_DOWN", False)  # the default: downproj_combine's reason, as before
    assert "QMM_DOWN" in moe_down.launch("cuda", *args, **kw).reason
    assert moe_down.qmm_example("cuda") is None and moe_gate_up.qmm_example("cuda") is None


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
@pytest.mark.parametrize("route", [False, True], ids=["inds", "route"])
@pytest.mark.parametrize("case", GATE_UP, ids=[str(c[:5]) for c in GATE_UP])
def test_gate_up_qmm_rows_take_a_warp_per_8_outputs_then_the_shared_rows(
    qmm_on, monkeypatch, case, route, pipelined
):
    monkeypatch.setattr(quant, "QMM_PIPELINED", pipelined)
    _, k, i, i_s = case[:4]
    args, kw = _gate_up(*case, mx.bfloat16, route=route)
    spec = _kernel(route).launch("cuda", *args, **kw)
    assert isinstance(spec, Launch), spec
    t = dict(spec.template)
    assert t["QMM"] is True and t["PIPE"] is pipelined and (t["I"], t["IS"], t["K"]) == (i, i_s, k)
    assert spec.grid == ((k * i // 8 + i_s) * 32, 1, 1)
    assert spec.threadgroup == (64 if pipelined else 256, 1, 1)  # moe_mlp's QMM blocks
    assert spec.output_shapes[:2] == [(1, 1, k, i), (1, 1, i_s)]
    monkeypatch.setattr(quant, "QMM_BLOCK", False)  # the rest of the launch is what it was
    off = _kernel(route).launch("cuda", *args, **kw)
    assert isinstance(off, Skip) and "qmm_sm80" in off.reason
    assert dict(_kernel(route).launch("metal", *args, **kw).template)["QMM"] is False


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
@pytest.mark.parametrize("case", DOWN, ids=[str(c[:3]) for c in DOWN])
def test_down_qmm_rows_take_a_block_of_k_warps_per_8_outputs(qmm_on, monkeypatch, case, pipelined):
    monkeypatch.setattr(quant, "QMM_PIPELINED", pipelined)
    monkeypatch.setattr(quant, "QMM_DOWN", False)  # downproj_combine's switch: not moe_down's
    n, _, k, i, d = case[:5]
    args, kw = _down(*case, mx.bfloat16)
    spec = moe_down.launch("cuda", *args, **kw)
    assert isinstance(spec, Launch), spec
    t = dict(spec.template)
    assert t["QMM"] is True and t["PIPE"] is pipelined and t["HAS_SHARED"] is (case[6] is not None)
    assert spec.grid == (n * (d // 8) * 32 * k, 1, 1) and spec.threadgroup == (32 * k, 1, 1)
    assert spec.output_shapes == [(n, d)]
    assert dict(moe_down.launch("metal", *args, **kw).template)["QMM"] is False


def test_qmv_rows_launch_as_before_whatever_the_switch(qmm_on, monkeypatch):
    """Below 8 rows (and for the dense variant) the launches are today's, QMM and PIPE false,
    with the switch on or off."""
    gu = _gate_up(12, 4, 256, 96, 384, (64, 4), (64, 4), mx.bfloat16)
    gu_route = _gate_up(12, 4, 256, 96, 384, (64, 4), (64, 4), mx.bfloat16, route=True)
    down = _down(1, 12, 4, 256, 384, (64, 4), (128, 64, 4), mx.bfloat16)
    dense_w = quantized_linear(384, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=1)
    dense = (down[0][0][:, 0], None, None, *dense_w, down[0][6]), dict(group_size=64, bits=4)
    calls = [
        (moe_gate_up.moe_gate_up, gu),
        (moe_gate_up.moe_gate_up_route, gu_route),
        (moe_down.moe_down, down),
        (moe_down.moe_down, dense),
    ]
    specs = {}
    for on in (True, False):
        monkeypatch.setattr(quant, "QMM_BLOCK", on)
        specs[on] = [kernel.launch("cuda", *args, **kw) for kernel, (args, kw) in calls]
    for a, b in zip(specs[True], specs[False]):
        assert isinstance(a, Launch) and isinstance(b, Launch)
        assert (a.template, a.grid, a.threadgroup) == (b.template, b.grid, b.threadgroup)
        assert dict(a.template)["QMM"] is False and dict(a.template)["PIPE"] is False
    gu_spec, _, down_spec, dense_spec = specs[True]
    assert gu_spec.grid == ((4 * 256 + 96) * 32, 1, 1) and gu_spec.threadgroup == (256, 1, 1)
    assert down_spec.grid == dense_spec.grid == (384 * 32, 1, 1) and down_spec.threadgroup == (256, 1, 1)


def test_shared_expert_rows_past_one_token_still_skip(qmm_on):
    """Two tokens' shared expert is a 2-row dense matmul: stock's sm90 qmm, not followed."""
    args, kw = _down(2, 16, 4, 256, 384, (64, 4), (128, 64, 4), mx.bfloat16)
    assert moe_down.launch("cuda", *args, **kw).reason.startswith("shared expert: 2 rows")


@pytest.mark.parametrize("kernel,example", [
    (moe_gate_up.moe_gate_up, moe_gate_up.qmm_example),
    (moe_gate_up.moe_gate_up_route, moe_gate_up.qmm_route_example),
    (moe_down.moe_down, moe_down.qmm_example),
], ids=["gate_up", "gate_up_route", "down"])  # fmt: skip
def test_the_self_check_runs_a_qmm_call_when_the_switch_is_on(qmm_on, monkeypatch, kernel, example):
    assert kernel.variant_example is example
    assert example("metal") is None
    args, kw = example("cuda")
    assert dict(kernel.launch("cuda", *args, **kw).template)["QMM"] is True
    got, want = kernel(*args, **kw), kernel.reference(*args, **kw)  # the CPU: the reference
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    assert all(mx.array_equal(a, b).item() for a, b in zip(got, want))
    monkeypatch.setattr(quant, "QMM_BLOCK", False)
    assert example("cuda") is None


# ---------------------------------------------------------------- moe_block keeps such steps


class _Layer(nn.Module):
    """What moe_block's launches read of a decoder layer: its norm and its MoE."""

    def __init__(self, moe, d):
        super().__init__()
        self.post_attention_layernorm = nn.RMSNorm(d, eps=1e-5)
        self.mlp = moe
        self.post_attention_layernorm.set_dtype(moe.gate.weight.dtype)


def _moe(shared: bool, dtype, *, d=256, i=128, experts=16, k=8, seed=0, packing=(64, 4)):
    """mlx-lm's Glm4MoeLiteMoE, top-k, random, in dtype, quantized (shared expert: Is = I)."""
    args = ModelArgs(
        hidden_size=d,
        intermediate_size=3 * i,
        moe_intermediate_size=i,
        n_shared_experts=1 if shared else None,
        n_routed_experts=experts,
        num_experts_per_tok=k,
    )
    mx.random.seed(seed)
    moe = Glm4MoeLiteMoE(args)
    moe.gate.weight = mx.random.normal((experts, d)) * d**-0.5
    moe.gate.e_score_correction_bias = mx.random.uniform(shape=(experts,)) * 0.1
    moe.set_dtype(dtype)
    nn.quantize(
        moe, group_size=packing[0], bits=packing[1], class_predicate=lambda _, m: hasattr(m, "to_quantized")
    )
    return moe


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "routed"])
def test_moe_block_keeps_top8_decode_steps_with_the_switch_on(qmm_on, monkeypatch, shared):
    """moe_block's plan on CUDA for one decode token of a top-8 layer: with QMM_BLOCK its three
    launches (none skips); without, mlx-lm's code, and why. (The kernels' self-checks are set
    aside: no GPU here.)"""
    layer = _Layer(_moe(shared, mx.bfloat16), 256)
    x, r = (mx.random.normal((1, 1, 256), key=mx.random.key(j)).astype(mx.bfloat16) for j in (1, 2))
    kernels = moe_block.PATTERN.kernels
    old = core.swap_statuses("cuda", dict.fromkeys(kernels, "no GPU in this test"))
    try:
        block = moe_block._build(layer, x, r, Routing(1e-20), "cuda")
        assert not isinstance(block, str), block
        names = [p.kernel.name for p in block.launches]
        assert names == (
            ["norm_router_gates", "moe_gate_up_route", "moe_down"]
            if shared
            else ["norm_router", "moe_mlp", "moe_down"]
        )
        assert all(p.skip is None for p in block.launches)
        monkeypatch.setattr(quant, "QMM_BLOCK", False)
        why = moe_block._build(layer, x, r, Routing(1e-20), "cuda")
        assert isinstance(why, str) and "8 expert rows: stock's qmm_sm80" in why
    finally:
        core.swap_statuses("cuda", old)


# ---------------------------------------------------------------- NVRTC


@needs_nvrtc
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_qmm_block_variant_compiles(qmm_on, monkeypatch, dtype, bits):
    """moe_gate_up (inds, route) with a quantized or unquantized shared expert, moe_down with and
    without one, scores in float32 or T; plain and pipelined dots."""
    for pipelined in (False, True):
        monkeypatch.setattr(quant, "QMM_PIPELINED", pipelined)
        for route in (False, True):
            for spacking in ((64, 8), (None, None)):
                args, kw = _gate_up(12, 8, 256, 96, 512, (64, bits), spacking, dtype, route=route)
                spec = _kernel(route).launch("cuda", *args, **kw)
                assert dict(spec.template)["QMM"] is True and dict(spec.template)["PIPE"] is pipelined
                cuda_check.compile_launch(_kernel(route), spec)  # raises with NVRTC's log
        for shared, in_t in (((96, 32, 8), False), ((96, None, None), True), (None, True), (None, False)):
            args, kw = _down(1, 12, 8, 256, 384, (64, bits), shared, dtype, scores_in_t=in_t)
            spec = moe_down.launch("cuda", *args, **kw)
            assert dict(spec.template)["QMM"] is True and dict(spec.template)["PIPE"] is pipelined
            cuda_check.compile_launch(moe_down.moe_down, spec)


# ---------------------------------------------------------------- on the GPU: bitwise stock


def _poisoned(kernel, args, kw):
    out = kernel.run_kernel("cuda", *args, init_value=float("nan"), **kw)
    assert not isinstance(out, Skip), out
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.cuda
@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("route", [False, True], ids=["inds", "route"])
@pytest.mark.parametrize("case", GATE_UP, ids=[str(c[:5]) for c in GATE_UP])
def test_cuda_qmm_gate_up_is_bitwise_stock(qmm_on, monkeypatch, case, route, dtype, pipelined):
    monkeypatch.setattr(quant, "QMM_PIPELINED", pipelined)
    args, kw = _gate_up(*case, dtype, seed=case[2] + case[4], route=route)
    assert dict(_kernel(route).launch("cuda", *args, **kw).template)["QMM"] is True
    got = _poisoned(_kernel(route), args, kw)
    want = _kernel(route).reference(*args, **kw)
    assert len(got) == len(want) and [a.dtype for a in got] == [a.dtype for a in want]
    for j, (a, b) in enumerate(zip(got, want)):  # hr, hs (and inds, scores)
        assert a.shape == b.shape and mx.array_equal(a, b).item(), (
            j,
            mx.abs(a.astype(mx.float32) - b).max().item(),
        )


@pytest.mark.cuda
@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("scores_in_t", [False, True], ids=["scores_f32", "scores_in_t"])
@pytest.mark.parametrize("case", DOWN, ids=[str(c[:3]) for c in DOWN])
def test_cuda_qmm_down_is_bitwise_stock(qmm_on, monkeypatch, case, scores_in_t, dtype, pipelined):
    monkeypatch.setattr(quant, "QMM_PIPELINED", pipelined)
    args, kw = _down(*case, dtype, seed=case[3] + case[4], scores_in_t=scores_in_t)
    assert dict(moe_down.launch("cuda", *args, **kw).template)["QMM"] is True
    (got,) = _poisoned(moe_down.moe_down, args, kw)
    want = moe_down.reference(*args, **kw)
    assert got.dtype == dtype and got.shape == want.shape
    assert mx.array_equal(got, want).item(), mx.abs(got.astype(mx.float32) - want).max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "routed"])
def test_cuda_qmm_launches_are_bitwise_mlx_lms_moe_half(qmm_on, dtype, shared):
    """mlx-lm's top-8 Glm4MoeLiteMoE after the stock router: moe_gate_up (moe_mlp without a shared
    expert) and moe_down in their QMM variants on the GPU give `h + moe(norm(h))` bitwise."""
    moe = _moe(shared, dtype, d=512, i=256, experts=24, seed=5)
    norm = nn.RMSNorm(512, eps=1e-5)
    norm.weight = (1 + 0.1 * mx.random.normal((512,), key=mx.random.key(6))).astype(dtype)
    x, r = (mx.random.normal((1, 1, 512), key=mx.random.key(j)).astype(dtype) for j in (7, 8))
    h = x + r
    xn = norm(h)
    want = h + moe(xn)
    inds, scores = moe.gate(xn)
    sw = moe.switch_mlp
    (g, kw), (u, _), (dn, _) = (weights_of(p) for p in (sw.gate_proj, sw.up_proj, sw.down_proj))
    if shared:
        se = moe.shared_experts
        (sg, skw), (su, _), (sd, _) = (weights_of(p) for p in (se.gate_proj, se.up_proj, se.down_proj))
        kw.update(shared_group_size=skw["group_size"], shared_bits=skw["bits"])
        assert dict(moe_gate_up.launch("cuda", xn, inds, *g, *u, *sg, *su, **kw).template)["QMM"] is True
        hr, hs = _poisoned(moe_gate_up.moe_gate_up, (xn, inds, *g, *u, *sg, *su), kw)
        down = (hr, inds, scores, *dn, h, hs, *sd)
    else:
        (hr,) = _poisoned(moe_mlp.moe_mlp, (xn, inds, *g, *u), kw)
        down = (hr, inds, scores, *dn, h)
    assert dict(moe_down.launch("cuda", *down, **kw).template)["QMM"] is True
    (got,) = _poisoned(moe_down.moe_down, down, kw)
    assert got.dtype == dtype and mx.array_equal(got, want).item()
