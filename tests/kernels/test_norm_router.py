"""norm_router: the residual add, post_attention_layernorm and the MoE router in one launch;
norm_router_gates: the same body without the routing (the gates out, over many threadgroups).

CPU: the reference is mlx-lm's own modules (the decoder layer's `x + r`, its RMSNorm and
glm4_moe_lite's MoEGate), not a copy of itself. The Metal body through the emulation: h
bitwise, xn and the scores as close to a float32 truth as stock is, the experts bitwise in
the GPU's order (clear gaps, or exact ties from duplicated gate rows); the two modes agree
bitwise. `cuda` tests: bitwise stock on the GPU."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import deepseek_v3, glm4_moe_lite

from zmlx.kernels import metal_emu, moe_router
from zmlx.kernels.core import Launch
from zmlx.kernels.norm_router import inputs, launch, norm_router, norm_router_gates, reference

EPS = 1e-5


def _kw(top_k, norm=True, scale=1.8):
    # glm4_moe_lite's router: + 1e-20 in the renormalization (fixed in its code)
    return dict(eps=EPS, top_k=top_k, routed_scaling_factor=scale, norm_topk_prob=norm, renorm_eps=1e-20)


def _ds_kw(top_k, n_group, topk_group):
    # DeepSeek-V3's router: group-limited, no epsilon in the renormalization
    return dict(
        eps=EPS,
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        renorm_eps=None,
    )


def stock(x, r, norm_w, gate_w, bias, *, eps, top_k, routed_scaling_factor, norm_topk_prob, **kw):
    """mlx-lm's modules: the decoder layer's residual add, post_attention_layernorm, MoEGate
    (glm4_moe_lite's with its + 1e-20, else deepseek_v3's)."""
    e, d = gate_w.shape
    module = glm4_moe_lite if kw.get("renorm_eps", 1e-20) is not None else deepseek_v3
    args = module.ModelArgs(
        hidden_size=d,
        n_routed_experts=e,
        num_experts_per_tok=top_k,
        n_group=kw.get("n_group", 1),
        topk_group=kw.get("topk_group", 1),
        routed_scaling_factor=routed_scaling_factor,
        norm_topk_prob=norm_topk_prob,
        rms_norm_eps=eps,
    )
    norm = nn.RMSNorm(d, eps=eps)
    norm.weight = norm_w
    gate = module.MoEGate(args)
    gate.weight = gate_w
    gate.e_score_correction_bias = bias
    h = x + r
    xn = norm(h)
    return (h, xn, *gate(xn))


def _tied(args):
    """Gate rows duplicated in pairs and the bias equal in pairs: each pair's biased scores tie
    exactly whatever the dot's order (the lower expert index must come first)."""
    x, r, norm_w, gate_w, bias = args
    pair = mx.arange(gate_w.shape[0]) // 2 * 2
    return x, r, norm_w, gate_w[pair], mx.round(bias[pair] * 16) / 16


CASES = [  # (tokens shape, D, experts, top_k, kwargs)
    ((1, 1), 2048, 64, 4, _kw(4)),  # GLM-4.7-Flash
    ((1, 1), 320, 40, 4, _kw(4)),  # odd: 2 values per lane in the gemv
    ((1,), 200, 7, 2, _kw(2, scale=1.0)),  # 1 value per lane, a partial warp of experts
    ((1, 1), 384, 64, 6, _kw(6)),  # two partial sums in the renormalization
    ((1, 1), 256, 256, 8, _kw(8, scale=2.5)),
    ((1,), 1536, 24, 3, _kw(3, norm=False)),
    ((1, 1), 512, 64, 1, _kw(1)),  # top-1: no renormalization
]
GROUP_CASES = [  # DeepSeek-V3's group-limited routing (8 groups, the best 4 kept), and odd ones
    ((1, 1), 2048, 256, 8, _ds_kw(8, 8, 4)),
    ((1, 1), 320, 64, 8, _ds_kw(8, 8, 4)),
    ((1,), 200, 24, 3, _ds_kw(3, 4, 2)),
]
DTYPES = [mx.bfloat16, mx.float16, mx.float32]


@pytest.mark.parametrize("lead,d,experts,top_k,kw", CASES[:4] + GROUP_CASES + [((2, 3), 320, 40, 4, _kw(4))])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_reference_is_mlx_lm_modules(lead, d, experts, top_k, kw, dtype, ties):
    args = inputs(lead, d, experts, dtype, d + experts)
    args = _tied(args) if ties else args
    got, want = reference(*args, **kw), stock(*args, **kw)
    assert [a.dtype for a in got] == [dtype, dtype, mx.uint32, mx.float32]
    assert all(a.dtype == b.dtype and mx.array_equal(a, b).item() for a, b in zip(got, want))
    # without the routing: the gates that, routed by moe_router's reference, give MoEGate's
    h, xn, gates = reference(*args[:4], eps=kw["eps"], route=False)
    router = {k: v for k, v in kw.items() if k != "eps"}
    assert gates.dtype == dtype and gates.shape == (*lead, experts)
    routed = moe_router.reference(gates, args[4], **router)
    assert all(a.dtype == b.dtype and mx.array_equal(a, b).item() for a, b in zip((h, xn, *routed), want))


def test_launch_says_why_it_takes_the_reference():
    args = inputs((1, 1), 320, 40, mx.bfloat16, 1)
    x, r, norm_w, gate_w, bias = args
    kw = _kw(4)
    assert launch("cuda", *args, **kw).grid == (512, 1, 1)  # one threadgroup per token
    assert "groups" in launch("cuda", *args, **{**kw, "n_group": 3, "topk_group": 2}).reason
    assert ("N_GROUP", 8) in launch("cuda", *args, **{**kw, "n_group": 8, "topk_group": 4}).template
    assert "top-k <= 8" in launch("cuda", *args, **{**kw, "top_k": 9}).reason
    wide = inputs((1, 1), 320, 300, mx.bfloat16, 1)
    assert "256 experts" in launch("cuda", *wide, **kw).reason
    q, _, _ = mx.quantize(gate_w.astype(mx.float32), group_size=64, bits=4)
    assert "quantized" in launch("cuda", x, r, norm_w, q, bias, **kw).reason
    assert "not in x's dtype" in launch("cuda", x, r, norm_w, gate_w.astype(mx.float32), bias, **kw).reason
    assert "one float dtype" in launch("cuda", x, r.astype(mx.float16), norm_w, gate_w, bias, **kw).reason
    assert "shapes" in launch("cuda", x, r[..., :64], norm_w, gate_w, bias, **kw).reason
    assert "bias" in launch("cuda", x, r, norm_w, gate_w, bias[:7], **kw).reason
    assert "threadgroup memory" in launch("cuda", *inputs((1,), 9000, 8, mx.float32, 1), **kw).reason
    assert "no bias" in launch("cuda", *args[:4], eps=EPS).reason


def test_without_routing_the_gate_dots_spread_over_threadgroups():
    """norm_router_gates: E / 8 threadgroups per token (the last one partial), one warp per
    expert, the gates (..., E) in x's dtype; no bias read, no routing template."""
    x, r, norm_w, gate_w, _ = inputs((1, 1), 320, 40, mx.bfloat16, 1)
    spec = norm_router_gates.launch("cuda", x, r, norm_w, gate_w, eps=EPS)
    t = dict(spec.template)
    assert (t["GROUPS"], t["GPT"], t["TG"]) == (5, 8, 256) and "K" not in t
    assert spec.grid == (5 * 256, 1, 1) and spec.threadgroup == (256, 1, 1)
    assert spec.inputs == [x, r, norm_w, gate_w]
    assert spec.output_shapes == [(1, 1, 320), (1, 1, 320), (1, 1, 40)]
    assert spec.output_dtypes == [mx.bfloat16] * 3
    long = norm_router_gates.launch("cuda", *inputs((1,), 12288, 7, mx.float16, 1)[:4], eps=EPS)
    assert dict(long.template)["TG"] == 1024 and long.grid == (1024, 1, 1)  # the norm's BLOCK, 7 experts
    assert (
        "cuBLAS"
        in norm_router_gates.launch("cuda", *inputs((2,), 320, 40, mx.float16, 1)[:4], eps=EPS).reason
    )
    assert dict(norm_router.launch("cuda", x, r, norm_w, gate_w, _, eps=EPS, top_k=4).template)["GROUPS"] == 1


def test_cuda_takes_one_token_where_stock_runs_gemv():
    """xn @ W.T with M > 1 rows is cuBLAS in MLX's CUDA matmul (gemv only at M == 1)."""
    args = inputs((2, 1), 320, 40, mx.bfloat16, 3)
    assert "cuBLAS" in launch("cuda", *args, **_kw(4)).reason
    spec = launch("metal", *args, **_kw(4))  # Metal is close anyway: one threadgroup per token
    assert isinstance(spec, Launch) and spec.grid[0] == 2 * spec.threadgroup[0]


def _limit_groups(biased, n_group=1, topk_group=1, **_):
    """DeepSeek-V3's group step with the GPU's stable sort: the n_group - topk_group groups of
    the lowest top-2 sums (ties: the lower group) are set to 0.0."""
    if n_group == 1:
        return biased
    groups = mx.unflatten(biased, -1, (n_group, -1))
    sums = mx.topk(groups, 2, axis=-1).sum(axis=-1, keepdims=True)
    low = mx.argsort(sums, axis=-2)[..., : n_group - topk_group, :]
    return mx.flatten(mx.put_along_axis(groups, low, mx.array(0.0), axis=-2), -2, -1)


def _gpu_order(gates, bias, inds=None, *, top_k, routed_scaling_factor, norm_topk_prob, renorm_eps, **kw):
    """The routing with argpartition replaced by a stable argsort (the order MLX's GPU sort
    returns; the CPU's argpartition leaves the k in no particular order), in float32 from
    `gates`; with `inds` given, the scores of those experts."""
    scores = mx.sigmoid(gates.astype(mx.float32))
    if inds is None:
        biased = _limit_groups(scores + bias, **kw)
        inds = mx.argsort(-biased, axis=-1)[..., :top_k].astype(mx.uint32)
    picked = mx.take_along_axis(scores, inds, axis=-1)
    if top_k > 1 and norm_topk_prob:
        den = picked.sum(axis=-1, keepdims=True)
        picked = picked / (den + renorm_eps if renorm_eps is not None else den)
    return inds, picked * routed_scaling_factor


def _truth(x, r, norm_w, gate_w, bias, *, eps, **_):
    """xn and the gates in float32 from stock's h (no rounding to T on the way)."""
    h = (x + r).astype(mx.float32)
    xn = mx.fast.rms_norm(h, norm_w.astype(mx.float32), eps)
    return xn, xn @ gate_w.astype(mx.float32).T


def _clear_or_tied(gates, bias, top_k, margin=0.005):
    """The k + 1 best biased scores are exactly tied or at least `margin` apart (a rounding
    of a gate moves a score by far less): then every order picks the same experts."""
    best = mx.sort(-(mx.sigmoid(gates.astype(mx.float32)) + bias), axis=-1)[..., : top_k + 1]
    gaps = best[..., 1:] - best[..., :-1]
    return mx.all((gaps == 0) | (gaps > margin)).item()


EMU_CASES = CASES[:5] + [((3,), 320, 40, 4, _kw(4)), ((1,), 64, 16, 4, _kw(4))]  # tokens; a 32-thread BLOCK


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("lead,d,experts,top_k,kw", EMU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, lead, d, experts, top_k, kw, dtype):
    for seed in range(7 * d + experts, 7 * d + experts + 100):  # the first inputs with clear gaps
        args = _tied(inputs(lead, d, experts, dtype, seed))
        xn_f32, gates_f32 = _truth(*args, **kw)
        if _clear_or_tied(gates_f32, args[4], top_k):
            break
    x, r, norm_w, gate_w, bias = args
    h, xn, inds, scores = metal_emu.run(norm_router, *args, workdir=tmp_path_factory.getbasetemp(), **kw)
    want_h, want_xn, _, _ = reference(*args, **kw)
    assert _clear_or_tied(gates_f32, bias, top_k)
    assert [a.dtype for a in (h, xn, inds, scores)] == [dtype, dtype, mx.uint32, mx.float32]
    assert mx.array_equal(h, want_h).item()
    want, bar = close_bar(lambda *a, **k: want_xn, lambda *a, **k: xn_f32, args, kw, dtype)
    assert mx.abs(xn.astype(mx.float32) - want).max().item() <= bar
    want_i, _ = _gpu_order(want_xn @ gate_w.T, bias, **kw)  # stock's gates, the GPU's order
    assert mx.array_equal(inds, want_i).item()
    stock_s = _gpu_order(want_xn @ gate_w.T, bias, want_i, **kw)[1]
    truth_s = _gpu_order(gates_f32, bias, want_i, **kw)[1]
    want, bar = close_bar(lambda *a, **k: stock_s, lambda *a, **k: truth_s, args, kw, dtype)
    assert mx.abs(scores - want).max().item() <= bar


# every case in one dtype, the dtypes taking turns (each in three cases): the claim is that two
# bodies from one source agree bitwise, and each compile of the emulation takes seconds; the
# routed body itself runs every case in every dtype above
HALF_CASES = [(*c, DTYPES[i % 3]) for i, c in enumerate(EMU_CASES + GROUP_CASES[1:])]


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("lead,d,experts,top_k,kw,dtype", HALF_CASES)
def test_metal_body_without_routing_is_the_routed_bodys_first_half(
    tmp_path_factory, close_bar, lead, d, experts, top_k, kw, dtype
):
    """norm_router_gates' Metal body (outputs poisoned by the emulation): h and xn bitwise the
    routing body's, written once for all its threadgroups; its gates, routed by moe_router's
    Metal body, give the routing body's inds and scores bitwise (the same dots, the same
    rounding to T); the gates as close to a float32 truth as stock's matmul is."""
    args = inputs(lead, d, experts, dtype, 5 * d + experts)
    work = tmp_path_factory.getbasetemp()
    h, xn, gates = metal_emu.run(norm_router_gates, *args[:4], workdir=work, eps=kw["eps"])
    routed = metal_emu.run(norm_router, *args, workdir=work, **kw)
    assert gates.dtype == dtype and gates.shape == (*lead, experts)
    assert mx.array_equal(h, routed[0]).item() and mx.array_equal(xn, routed[1]).item()
    router = {k: v for k, v in kw.items() if k != "eps"}
    inds, scores = metal_emu.run(moe_router.moe_router, gates, args[4], workdir=work, **router)
    assert mx.array_equal(inds, routed[2]).item() and mx.array_equal(scores, routed[3]).item()
    xn_f32, gates_f32 = _truth(*args, **kw)
    stock_gates = reference(*args, route=False, **kw)[2]
    want, bar = close_bar(lambda *a, **k: stock_gates, lambda *a, **k: gates_f32, args, kw, dtype)
    assert mx.abs(gates.astype(mx.float32) - want).max().item() <= bar


@pytest.mark.parametrize("lead,d,experts,top_k,kw", GROUP_CASES)
def test_gpu_order_limits_groups_as_mlx_lm(lead, d, experts, top_k, kw):
    """The emulation test's GPU-order routing picks the experts mlx-lm's MoEGate picks on the
    CPU (the same set; the CPU's argpartition leaves it in another order)."""
    args = inputs(lead, d, experts, mx.float32, d)
    _, xn, want_i, _ = stock(*args, **kw)
    got_i, _ = _gpu_order(xn @ args[3].T, args[4], **kw)
    assert mx.array_equal(mx.sort(got_i, axis=-1), mx.sort(want_i, axis=-1)).item()


def _clear(values, margin=0.005):
    """Sorted, neighbours exactly tied or at least `margin` apart (a rounding of a gate moves
    them by far less): every order of the dot ranks them alike."""
    gaps = mx.diff(mx.sort(values, axis=-1), axis=-1)
    return mx.all((gaps == 0) | (gaps > margin)).item()


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("lead,d,experts,top_k,kw", GROUP_CASES)
def test_metal_body_limits_groups_like_the_gpu(tmp_path_factory, lead, d, experts, top_k, kw):
    """Group-limited routing in the Metal body: on inputs whose group sums and limited top-k
    have clear gaps in a float32 truth, the experts bitwise in the GPU's order."""
    for seed in range(d + experts, d + experts + 200):
        args = inputs(lead, d, experts, mx.bfloat16, seed)
        biased = mx.sigmoid(_truth(*args, **kw)[1]) + args[4]
        sums = mx.topk(mx.unflatten(biased, -1, (kw["n_group"], -1)), 2, axis=-1).sum(axis=-1)
        if _clear(sums) and _clear(-mx.sort(-_limit_groups(biased, **kw), axis=-1)[..., : top_k + 1]):
            break
    else:
        pytest.fail("no inputs with clear gaps")
    got = metal_emu.run(norm_router, *args, workdir=tmp_path_factory.getbasetemp(), **kw)
    want_xn = reference(*args, **kw)[1]
    want_i, want_s = _gpu_order(want_xn @ args[3].T, args[4], **kw)
    assert mx.array_equal(got[2], want_i).item()
    assert mx.allclose(got[3], want_s, rtol=norm_router.tolerance, atol=norm_router.tolerance).item()


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_metal_self_check_example_routes_like_the_gpu(tmp_path_factory):
    """The example the self-check runs has clear gaps: a float32 dot picks stock's experts."""
    args, kw = norm_router.example()
    got = metal_emu.run(norm_router, *args, workdir=tmp_path_factory.getbasetemp(), **kw)
    want_xn = reference(*args, **kw)[1]
    want_i, want_s = _gpu_order(want_xn @ args[3].T, args[4], **kw)
    assert mx.array_equal(got[2], want_i).item()
    assert mx.allclose(got[3], want_s, rtol=norm_router.tolerance, atol=norm_router.tolerance).item()


@pytest.mark.cuda
@pytest.mark.parametrize(
    "lead,d,experts,top_k,kw", CASES + GROUP_CASES + [((1, 1), 5120, 160, 8, _kw(8, scale=2.5))]
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("route", [True, False], ids=["norm_router", "norm_router_gates"])
def test_cuda_kernel_is_bitwise_stock(lead, d, experts, top_k, kw, dtype, ties, route):
    """Both modes against mlx-lm's modules on the GPU; without the routing the gates are
    MoEGate's matmul `xn @ W.T` on stock's xn."""
    args = inputs(lead, d, experts, dtype, 3 * d + experts + ties)
    args = _tied(args) if ties else args
    want = stock(*args, **kw)
    if route:
        got = norm_router.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    else:
        got = norm_router_gates.run_kernel("cuda", *args[:4], init_value=float("nan"), eps=kw["eps"])
        want = (*want[:2], want[1] @ args[3].T)
    for name, a, b in zip(("h", "xn", "inds", "scores") if route else ("h", "xn", "gates"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert mx.array_equal(a, b).item(), name


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", [norm_router, norm_router_gates], ids=lambda k: k.name)
def test_cuda_kernel_is_what_runs(kernel):
    assert kernel.plan("cuda").path == "kernel", kernel.plan("cuda").reason
