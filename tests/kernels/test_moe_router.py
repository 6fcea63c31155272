"""moe_router's reference is bitwise mlx-lm's router (glm4_moe_lite and deepseek_v3)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import deepseek_v3, glm4_moe_lite

from zmlx.kernels.moe_router import reference

SHAPES = [  # (tokens shape, experts, top_k, n_group, topk_group)
    ((1, 1), 64, 4, 1, 1),  # GLM-4.7-Flash decode
    ((2, 37), 64, 4, 1, 1),  # prompt, batch 2
    ((3,), 7, 2, 1, 1),  # odd
    ((1, 5), 256, 8, 8, 4),  # DeepSeek-V3 grouping
    ((4, 3), 24, 3, 4, 2),
]


@pytest.mark.parametrize("shape,experts,top_k,n_group,topk_group", SHAPES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_router_reference_matches_glm4_moe_lite(shape, experts, top_k, n_group, topk_group, dtype):
    key = mx.random.key(experts * 31 + top_k)
    gates = (mx.random.normal((*shape, experts), key=key) * 2).astype(dtype)
    bias = mx.random.normal((experts,), key=mx.random.key(1)) * 0.05
    args = (gates, bias, top_k, n_group, topk_group, 1.8, True)
    want_i, want_s = glm4_moe_lite.group_expert_select(*args)
    got_i, got_s = reference(
        gates,
        bias,
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=1.8,
        norm_topk_prob=True,
        renorm_eps=1e-20,
    )
    assert got_i.dtype == want_i.dtype and got_s.dtype == want_s.dtype == mx.float32
    assert mx.array_equal(got_i, want_i).item()
    assert mx.array_equal(got_s, want_s).item()


@pytest.mark.parametrize("norm", [True, False])
def test_router_reference_matches_deepseek_v3_without_epsilon(norm):
    gates = mx.random.normal((2, 9, 256), key=mx.random.key(3)).astype(mx.bfloat16)
    bias = mx.random.normal((256,), key=mx.random.key(4)) * 0.05
    want = deepseek_v3.group_expert_select(gates, bias, 8, 8, 4, 2.5, norm)
    got = reference(
        gates,
        bias,
        top_k=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm,
        renorm_eps=None,
    )
    assert all(mx.array_equal(a, b).item() for a, b in zip(got, want))


GATE_CONFIGS = [  # (experts, top_k, n_group, topk_group)
    (256, 8, 8, 4),  # DeepSeek-V3 / Kimi-K2
    (64, 8, 8, 4),  # groups of 8
    (64, 4, 1, 1),  # one group: unchanged
    (24, 3, 4, 2),  # odd
]


@pytest.mark.parametrize("experts,top_k,n_group,topk_group", GATE_CONFIGS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("ties", [False, True])
def test_moe_router_call_is_deepseek_v3_moegate(experts, top_k, n_group, topk_group, dtype, ties):
    """The moe_router pattern's __call__ (on the CPU: the reference) against mlx-lm's own
    deepseek_v3 MoEGate module, the gate in each dtype; with ties, coarse weights and a
    bias that is zero on half the experts make many equal scores and group sums."""
    from zmlx.patch.patterns.moe_router import make

    args = deepseek_v3.ModelArgs(
        hidden_size=16,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.5,
    )
    gate = deepseek_v3.MoEGate(args)
    w = mx.random.normal((experts, 16), key=mx.random.key(experts + n_group)) * 0.5
    bias = mx.random.normal((experts,), key=mx.random.key(7)) * 0.05
    x = mx.random.normal((2, 5, 16), key=mx.random.key(8))
    if ties:
        w, x = mx.round(w * 2) / 2, mx.round(x)
        bias = mx.where(mx.arange(experts) % 2 == 0, 0.0, mx.round(bias * 64) / 64)
    gate.weight, gate.e_score_correction_bias = w.astype(dtype), bias
    want = gate(x.astype(dtype))
    got = make(None)(gate, x.astype(dtype))
    assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
    assert mx.array_equal(got[0], want[0]).item()
    assert mx.array_equal(got[1], want[1]).item()


def test_epsilon_is_not_ignored():
    """Tiny unbiased scores: with and without +1e-20 the renormalized scores differ."""
    gates = mx.full((1, 8), -100.0)
    bias = mx.arange(8, dtype=mx.float32)
    with_eps = reference(gates, bias, top_k=2, renorm_eps=1e-20)[1]
    without = reference(gates, bias, top_k=2, renorm_eps=None)[1]
    assert not mx.array_equal(with_eps, without).item()


# ---------------------------------------------------------------- the fused kernel

from zmlx.kernels import metal_emu  # noqa: E402
from zmlx.kernels.moe_router import launch, moe_router  # noqa: E402

GLM = dict(routed_scaling_factor=1.8, norm_topk_prob=True, renorm_eps=1e-20)
DS = dict(routed_scaling_factor=2.5, norm_topk_prob=True, renorm_eps=None)
KERNEL_SHAPES = [  # (tokens shape, experts, top_k, kwargs)
    ((1, 1), 64, 4, GLM),  # GLM-4.7-Flash decode
    ((2, 37), 64, 4, GLM),  # prompt, batch 2
    ((3,), 7, 2, GLM),  # odd
    ((1, 5), 256, 8, dict(routed_scaling_factor=2.5, norm_topk_prob=True, renorm_eps=None)),
    ((4, 3), 24, 3, dict(routed_scaling_factor=1.0, norm_topk_prob=False, renorm_eps=None)),
    ((2,), 64, 1, GLM),  # top-1: no renormalize
    ((1, 1), 64, 6, GLM),  # two partial sums of 4 and 2
    # group-limited (DeepSeek-V3: no epsilon; GLM-5 and Kimi route the same way)
    ((1, 5), 256, 8, dict(DS, n_group=8, topk_group=4)),
    ((2, 3), 64, 8, dict(DS, n_group=8, topk_group=4)),
    ((3,), 24, 3, dict(GLM, n_group=4, topk_group=2)),
    ((2,), 64, 4, dict(DS, n_group=8, topk_group=8)),  # every group kept
    ((1, 2), 16, 2, dict(DS, n_group=8, topk_group=1)),  # groups of 2: topk is the group
    # kept scores below zero: experts of the zeroed groups (0.0) win the top-k
    ((2, 1), 64, 8, dict(DS, n_group=8, topk_group=4, bias_shift=-1.5)),
]


def _inputs(shape, experts, dtype, seed, ties, kw=None):
    """(gates, bias, the kernel's keyword arguments: kw without the test's own bias_shift)."""
    kw = dict(kw or {})
    gates = mx.random.normal((*shape, experts), key=mx.random.key(seed)) * 2
    bias = mx.random.normal((experts,), key=mx.random.key(seed + 1)) * 0.05 + kw.pop("bias_shift", 0.0)
    if ties:  # coarse gates and a zero bias on half the experts: many exactly equal scores
        gates = mx.round(gates * 2) / 2
        bias = mx.where(mx.arange(experts) % 2 == 0, 0.0, mx.round(bias * 64) / 64)
    return gates.astype(dtype), bias, kw


def _stock(gates, bias, top_k, kw):
    """mlx-lm's router on this backend (glm4_moe_lite with its +1e-20, else deepseek_v3)."""
    mod = glm4_moe_lite if kw["renorm_eps"] is not None else deepseek_v3
    scale, norm = kw["routed_scaling_factor"], kw["norm_topk_prob"]
    return mod.group_expert_select(
        gates, bias, top_k, kw.get("n_group", 1), kw.get("topk_group", 1), scale, norm
    )


def _zero_groups(biased, n_group, topk_group):
    """DeepSeek-V3's group step as the GPU runs it, in numpy (float32): a group's score is
    the sum of its two largest biased scores; the n_group - topk_group groups first in a
    stable ascending sort of the sums (NaN last) are set to 0.0."""
    b = np.array(biased, dtype=np.float32)
    groups = b.reshape(*b.shape[:-1], n_group, -1)
    top2 = np.sort(groups, axis=-1)[..., -2:]  # numpy sorts NaN last too
    sums = top2[..., 0] + top2[..., 1]
    order = np.argsort(sums, axis=-1, kind="stable")[..., : n_group - topk_group]
    np.put_along_axis(groups, order[..., None], np.float32(0.0), axis=-2)
    return mx.array(groups.reshape(b.shape))


def _gpu_order_reference(gates, bias, top_k, kw):
    """The router as MLX's GPU runs it, with argpartition replaced by a stable argsort: the
    order MLX's GPU argpartition (a stable merge sort) returns. MLX's CPU argpartition
    leaves the k chosen in no particular order."""
    scores = mx.sigmoid(gates.astype(mx.float32))
    biased = scores + bias
    if kw.get("n_group", 1) > 1:
        biased = _zero_groups(biased, kw["n_group"], kw["topk_group"])
    inds = mx.argsort(-biased, axis=-1)[..., :top_k]
    picked = mx.take_along_axis(scores, inds, axis=-1)
    if top_k > 1 and kw["norm_topk_prob"]:
        den = picked.sum(axis=-1, keepdims=True)
        picked = picked / (den + kw["renorm_eps"] if kw["renorm_eps"] is not None else den)
    return inds, picked * kw["routed_scaling_factor"]


@pytest.mark.parametrize("shape,experts,top_k,kw", KERNEL_SHAPES)
def test_gpu_order_reference_chooses_stocks_experts(shape, experts, top_k, kw):
    """The emulation tests' GPU-order reference picks the experts mlx-lm picks on the CPU
    (without ties the set is the same; the CPU's argpartition leaves it in another order)."""
    gates, bias, kw = _inputs(shape, experts, mx.float32, experts + 5 * top_k, False, kw)
    want_i, want_s = _stock(gates, bias, top_k, kw)
    got_i, got_s = _gpu_order_reference(gates, bias, top_k, kw)
    order_w, order_g = mx.argsort(want_i, axis=-1), mx.argsort(got_i, axis=-1)
    take = mx.take_along_axis
    assert mx.array_equal(take(want_i, order_w, axis=-1), take(got_i, order_g, axis=-1)).item()
    assert mx.allclose(take(want_s, order_w, axis=-1), take(got_s, order_g, axis=-1), rtol=1e-6).item()


def test_launch_says_why_it_takes_the_reference():
    g, b = mx.zeros((1, 64)), mx.zeros((64,))
    assert "groups" in launch("cuda", g, b, top_k=4, n_group=64, topk_group=4).reason
    assert "groups" in launch("cuda", g, b, top_k=4, n_group=3, topk_group=1).reason
    assert "topk_group=9" in launch("cuda", g, b, top_k=4, n_group=8, topk_group=9).reason
    assert ("N_GROUP", 8) in launch("cuda", g, b, top_k=4, n_group=8, topk_group=4).template
    assert ("TOPK_GROUP", 1) in launch("cuda", g, b, top_k=4, n_group=1, topk_group=4).template
    assert "top-k <= 8" in launch("cuda", g, b, top_k=9).reason
    assert "256 experts" in launch("cuda", mx.zeros((1, 300)), mx.zeros((300,)), top_k=4).reason
    assert "bias of shape" in launch("cuda", g, mx.zeros((63,)), top_k=4).reason
    assert launch("cuda", g, b, top_k=4).template[0] == ("E", 64)


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("shape,experts,top_k,kw", KERNEL_SHAPES[:5] + KERNEL_SHAPES[6:])
@pytest.mark.parametrize("ties", [False, True])
def test_metal_body_routes_like_the_gpu(tmp_path_factory, shape, experts, top_k, kw, ties):
    """The Metal body through the emulation: the same experts in the GPU's order (exact)
    and the same scores up to the CPU's own exp (MLX's CPU sigmoid is not std::exp)."""
    gates, bias, kw = _inputs(shape, experts, mx.bfloat16, experts + top_k, ties, kw)
    inds, scores = metal_emu.run(
        moe_router, gates, bias, top_k=top_k, workdir=tmp_path_factory.getbasetemp(), **kw
    )
    want_i, want_s = _gpu_order_reference(gates, bias, top_k, kw)
    assert inds.dtype == mx.uint32 and scores.dtype == mx.float32
    assert mx.array_equal(inds, want_i).item()
    assert mx.allclose(scores, want_s, rtol=1e-6, atol=0).item()


def _group_tie_inputs(nan: bool):
    """64 experts in 8 groups of one gate pattern shifted per group: groups with the same
    shift have the same sums (ties to the lower group), and equal experts across groups tie
    in the top-k; with `nan`, one expert of group 1 is NaN (its group's sum is NaN: kept)."""
    pattern = mx.round(mx.random.normal((2, 1, 8), key=mx.random.key(5)) * 2) / 2
    shift = mx.array([0.0, 0.5, 0.0, 1.0, 0.5, 0.0, 1.0, -0.5])[:, None]
    gates = (pattern + shift).reshape(2, 64)
    if nan:
        gates = mx.where(mx.arange(64) == 9, float("nan"), gates)
    return gates.astype(mx.bfloat16), mx.zeros((64,))


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize("topk_group", [2, 4, 5])
def test_metal_body_breaks_group_ties_like_the_gpu(tmp_path_factory, nan, topk_group):
    gates, bias = _group_tie_inputs(nan)
    kw = dict(DS, n_group=8, topk_group=topk_group)
    workdir = tmp_path_factory.getbasetemp()
    inds, scores = metal_emu.run(moe_router, gates, bias, top_k=8, workdir=workdir, **kw)
    want_i, want_s = _gpu_order_reference(gates, bias, 8, kw)
    assert mx.array_equal(inds, want_i).item()
    assert mx.allclose(scores, want_s, rtol=1e-6, atol=0).item()


@pytest.mark.cuda
@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize("topk_group", [2, 4, 5])
def test_cuda_kernel_breaks_group_ties_like_stock(nan, topk_group):
    gates, bias = _group_tie_inputs(nan)
    kw = dict(DS, n_group=8, topk_group=topk_group)
    want_i, want_s = _stock(gates, bias, 8, kw)
    for poison in (float("nan"), 1e9):
        got_i, got_s = moe_router.run_kernel("cuda", gates, bias, top_k=8, init_value=poison, **kw)
        assert mx.array_equal(got_i, want_i).item()
        assert mx.array_equal(got_s, want_s).item()


@pytest.mark.cuda
@pytest.mark.parametrize("shape,experts,top_k,kw", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("ties", [False, True])
def test_cuda_kernel_is_bitwise_stock(shape, experts, top_k, kw, dtype, ties):
    gates, bias, kw = _inputs(shape, experts, dtype, experts * 3 + top_k, ties, kw)
    want_i, want_s = _stock(gates, bias, top_k, kw)
    for poison in (float("nan"), 1e9):  # an unwritten index or score shows either way
        got_i, got_s = moe_router.run_kernel("cuda", gates, bias, top_k=top_k, init_value=poison, **kw)
        assert got_i.dtype == want_i.dtype and got_s.dtype == want_s.dtype
        assert mx.array_equal(got_i, want_i).item()
        assert mx.array_equal(got_s, want_s).item()


@pytest.mark.cuda
def test_cuda_kernel_is_what_runs():
    assert moe_router.plan("cuda").path == "kernel", moe_router.plan("cuda").reason
