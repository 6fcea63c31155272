"""moe_router's reference is bitwise mlx-lm's router (glm4_moe_lite and deepseek_v3)."""

import mlx.core as mx
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
KERNEL_SHAPES = [  # (tokens shape, experts, top_k, kwargs)
    ((1, 1), 64, 4, GLM),  # GLM-4.7-Flash decode
    ((2, 37), 64, 4, GLM),  # prompt, batch 2
    ((3,), 7, 2, GLM),  # odd
    ((1, 5), 256, 8, dict(routed_scaling_factor=2.5, norm_topk_prob=True, renorm_eps=None)),
    ((4, 3), 24, 3, dict(routed_scaling_factor=1.0, norm_topk_prob=False, renorm_eps=None)),
    ((2,), 64, 1, GLM),  # top-1: no renormalize
    ((1, 1), 64, 6, GLM),  # two partial sums of 4 and 2
]


def _inputs(shape, experts, dtype, seed, ties):
    gates = mx.random.normal((*shape, experts), key=mx.random.key(seed)) * 2
    bias = mx.random.normal((experts,), key=mx.random.key(seed + 1)) * 0.05
    if ties:  # coarse gates and a zero bias on half the experts: many exactly equal scores
        gates = mx.round(gates * 2) / 2
        bias = mx.where(mx.arange(experts) % 2 == 0, 0.0, mx.round(bias * 64) / 64)
    return gates.astype(dtype), bias


def _stock(gates, bias, top_k, kw):
    """mlx-lm's router on this backend (glm4_moe_lite with its +1e-20, else deepseek_v3)."""
    mod = glm4_moe_lite if kw["renorm_eps"] is not None else deepseek_v3
    scale, norm = kw["routed_scaling_factor"], kw["norm_topk_prob"]
    return mod.group_expert_select(gates, bias, top_k, 1, 1, scale, norm)


def _gpu_order_reference(gates, bias, top_k, kw):
    """The reference with argpartition replaced by a stable argsort: the order MLX's GPU
    argpartition (a stable merge sort) returns. MLX's CPU argpartition leaves the k
    chosen in no particular order."""
    scores = mx.sigmoid(gates.astype(mx.float32))
    inds = mx.argsort(-(scores + bias), axis=-1)[..., :top_k]
    picked = mx.take_along_axis(scores, inds, axis=-1)
    if top_k > 1 and kw["norm_topk_prob"]:
        den = picked.sum(axis=-1, keepdims=True)
        picked = picked / (den + kw["renorm_eps"] if kw["renorm_eps"] is not None else den)
    return inds, picked * kw["routed_scaling_factor"]


def test_launch_says_why_it_takes_the_reference():
    g, b = mx.zeros((1, 64)), mx.zeros((64,))
    assert "group-limited" in launch("cuda", g, b, top_k=4, n_group=8, topk_group=4).reason
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
    gates, bias = _inputs(shape, experts, mx.bfloat16, experts + top_k, ties)
    inds, scores = metal_emu.run(
        moe_router, gates, bias, top_k=top_k, workdir=tmp_path_factory.getbasetemp(), **kw
    )
    want_i, want_s = _gpu_order_reference(gates, bias, top_k, kw)
    assert inds.dtype == mx.uint32 and scores.dtype == mx.float32
    assert mx.array_equal(inds, want_i).item()
    assert mx.allclose(scores, want_s, rtol=1e-6, atol=0).item()


@pytest.mark.cuda
@pytest.mark.parametrize("shape,experts,top_k,kw", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("ties", [False, True])
def test_cuda_kernel_is_bitwise_stock(shape, experts, top_k, kw, dtype, ties):
    gates, bias = _inputs(shape, experts, dtype, experts * 3 + top_k, ties)
    want_i, want_s = _stock(gates, bias, top_k, kw)
    for poison in (float("nan"), 1e9):  # an unwritten index or score shows either way
        got_i, got_s = moe_router.run_kernel("cuda", gates, bias, top_k=top_k, init_value=poison, **kw)
        assert got_i.dtype == want_i.dtype and got_s.dtype == want_s.dtype
        assert mx.array_equal(got_i, want_i).item()
        assert mx.array_equal(got_s, want_s).item()


@pytest.mark.cuda
def test_cuda_kernel_is_what_runs():
    assert moe_router.plan("cuda").path == "kernel", moe_router.plan("cuda").reason
