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
        gates, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=1.8, norm_topk_prob=True, renorm_eps=1e-20,
    )
    assert got_i.dtype == want_i.dtype and got_s.dtype == want_s.dtype == mx.float32
    assert mx.array_equal(got_i, want_i).item()
    assert mx.array_equal(got_s, want_s).item()


@pytest.mark.parametrize("norm", [True, False])
def test_router_reference_matches_deepseek_v3_without_epsilon(norm):
    gates = mx.random.normal((2, 9, 256), key=mx.random.key(3)).astype(mx.bfloat16)
    bias = mx.random.normal((256,), key=mx.random.key(4)) * 0.05
    want = deepseek_v3.group_expert_select(gates, bias, 8, 8, 4, 2.5, norm)
    got = reference(gates, bias, top_k=8, n_group=8, topk_group=4,
                    routed_scaling_factor=2.5, norm_topk_prob=norm, renorm_eps=None)
    assert all(mx.array_equal(a, b).item() for a, b in zip(got, want))


def test_epsilon_is_not_ignored():
    """Tiny unbiased scores: with and without +1e-20 the renormalized scores differ."""
    gates = mx.full((1, 8), -100.0)
    bias = mx.arange(8, dtype=mx.float32)
    with_eps = reference(gates, bias, top_k=2, renorm_eps=1e-20)[1]
    without = reference(gates, bias, top_k=2, renorm_eps=None)[1]
    assert not mx.array_equal(with_eps, without).item()
