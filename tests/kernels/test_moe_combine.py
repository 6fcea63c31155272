"""moe_combine's reference is bitwise mlx-lm's combine (`Glm4MoeLiteMoE.__call__`)."""

import mlx.core as mx
import pytest

from zmlx.kernels.moe_combine import reference


def stock(y, scores, shared):
    # Verbatim from mlx-lm's glm4_moe_lite MoE block.
    y = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
    if shared is not None:
        y = y + shared
    return y


@pytest.mark.parametrize("lead", [(1, 1), (2, 13), (5,)])
@pytest.mark.parametrize("k,d", [(4, 2048), (3, 123), (1, 64)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("with_shared", [True, False])
def test_combine_reference_matches_stock(lead, k, d, dtype, with_shared):
    y = mx.random.normal((*lead, k, d), key=mx.random.key(d)).astype(dtype)
    scores = mx.random.uniform(shape=(*lead, k), key=mx.random.key(k))
    shared = mx.random.normal((*lead, d), key=mx.random.key(7)).astype(dtype) if with_shared else None
    got, want = reference(y, scores, shared), stock(y, scores, shared)
    assert got.dtype == want.dtype == dtype
    assert mx.array_equal(got, want).item()


@pytest.mark.cuda
@pytest.mark.parametrize("lead", [(1, 1), (2, 13), (5,)])
@pytest.mark.parametrize("k,d", [(4, 2048), (3, 123), (1, 64)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("with_shared", [True, False])
def test_cuda_kernel_is_bitwise_the_reference(lead, k, d, dtype, with_shared):
    from zmlx.kernels.moe_combine import moe_combine

    seed = d * 7 + k
    y = (mx.random.normal((*lead, k, d), key=mx.random.key(seed)) * 3).astype(dtype)
    scores = mx.random.uniform(shape=(*lead, k), key=mx.random.key(seed + 1)) * 1.8
    shared = mx.random.normal((*lead, d), key=mx.random.key(seed + 2)).astype(dtype) if with_shared else None
    # Poisoned output: an element the kernel leaves unwritten stays NaN and fails array_equal.
    got = moe_combine.run_kernel("cuda", y, scores, shared, init_value=float("nan"))
    want = stock(y, scores, shared)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert mx.array_equal(got, want).item()


@pytest.mark.cuda
def test_cuda_kernel_is_what_runs():
    from zmlx.kernels.moe_combine import moe_combine

    assert moe_combine.plan("cuda").path == "kernel", moe_combine.plan("cuda").reason
