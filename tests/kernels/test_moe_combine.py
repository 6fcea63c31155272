"""moe_combine's reference is bitwise the combine in mlx-lm's own `Glm4MoeLiteMoE.__call__`."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import glm4_moe_lite

from zmlx import backend
from zmlx.kernels.moe_combine import moe_combine, reference

# (activation dtype, expert bits): bfloat16 with affine 4-bit experts is how users run it;
# unquantized bfloat16/float16 experts need a GPU (MLX's CPU gather_mm is float32 only)
_GPU_ONLY = pytest.mark.skipif(backend.current() == "cpu", reason="MLX's CPU gather_mm is float32 only")
KINDS = [
    (mx.float32, None),
    (mx.bfloat16, 4),
    (mx.float16, 8),
    pytest.param(mx.bfloat16, None, marks=_GPU_ONLY),
    pytest.param(mx.float16, None, marks=_GPU_ONLY),
]


def _moe(dtype, bits, shared_experts, seed, hidden=64, experts=8, top_k=4):
    """mlx-lm's MoE block at a tiny size, random weights (a random router: distinct experts
    per token), in `dtype` with the router bias kept float32 (mlx-lm's cast_predicate)."""
    args = glm4_moe_lite.ModelArgs(
        hidden_size=hidden,
        moe_intermediate_size=32,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_shared_experts=shared_experts,
    )
    mx.random.seed(seed)
    moe = glm4_moe_lite.Glm4MoeLiteMoE(args)
    moe.gate.weight = mx.random.normal((experts, hidden), key=mx.random.key(seed + 1)) * hidden**-0.5
    moe.set_dtype(dtype)
    moe.gate.e_score_correction_bias = mx.random.normal((experts,), key=mx.random.key(seed + 2)) * 0.05
    if bits is not None:
        nn.quantize(
            moe,
            group_size=32,
            bits=bits,
            class_predicate=lambda path, m: hasattr(m, "to_quantized") and not path.endswith("gate"),
        )
    return moe


def _parts(moe, x):
    """What the combine receives, computed by the block's own submodules as its __call__ does."""
    inds, scores = moe.gate(x)
    y = moe.switch_mlp(x, inds)
    shared = moe.shared_experts(x) if moe.config.n_shared_experts is not None else None
    return y, scores, shared


@pytest.mark.parametrize("dtype,bits", KINDS)
@pytest.mark.parametrize("shared_experts", [1, 2, None])
@pytest.mark.parametrize("lead", [(1, 1), (2, 13), (3, 1)])
def test_reference_is_mlx_lm_moe_block(dtype, bits, shared_experts, lead):
    moe = _moe(dtype, bits, shared_experts, seed=len(lead) * 10 + lead[-1])
    x = mx.random.normal((*lead, 64), key=mx.random.key(lead[-1])).astype(dtype)
    want = moe(x)  # mlx-lm's Glm4MoeLiteMoE.__call__
    y, scores, shared = _parts(moe, x)
    assert scores.dtype == mx.float32 and y.shape == (*lead, 4, 64)
    got = reference(y, scores, shared)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert mx.array_equal(got, want).item()


def _qwen3_block(seed, hidden=64, experts=8, top_k=4):
    """mlx-lm's Qwen3-MoE block at a tiny size, bfloat16, affine 4-bit experts."""
    from mlx_lm.models import qwen3_moe

    args = qwen3_moe.ModelArgs(
        model_type="qwen3_moe", hidden_size=hidden, num_hidden_layers=1, intermediate_size=64,
        num_attention_heads=2, num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1,
        mlp_only_layers=[], moe_intermediate_size=32, rms_norm_eps=1e-6, vocab_size=32,
        num_key_value_heads=1, head_dim=32, rope_theta=1e6, tie_word_embeddings=False,
        max_position_embeddings=64, norm_topk_prob=True,
    )  # fmt: skip
    mx.random.seed(seed)
    block = qwen3_moe.Qwen3MoeSparseMoeBlock(args)
    block.set_dtype(mx.bfloat16)
    nn.quantize(block.switch_mlp, group_size=32, bits=4)
    return block


@pytest.mark.parametrize("lead", [(1, 1), (2, 13)])
def test_reference_with_scores_in_t_is_mlx_lm_qwen3_moe_block(lead):
    """A softmax router's scores are in the activations' dtype: the reference (stock's ops)
    is then the block's own combine, products and sum in bfloat16."""
    block = _qwen3_block(seed=lead[-1])
    x = mx.random.normal((*lead, 64), key=mx.random.key(7)).astype(mx.bfloat16)
    gates = mx.softmax(block.gate(x), axis=-1, precise=True)
    inds = mx.argpartition(gates, kth=-4, axis=-1)[..., -4:]
    scores = mx.take_along_axis(gates, inds, axis=-1)
    scores = scores / mx.sum(scores, axis=-1, keepdims=True)
    assert scores.dtype == mx.bfloat16
    got = reference(block.switch_mlp(x, inds), scores)
    assert mx.array_equal(got, block(x)).item()


def test_the_comparison_sees_a_wrong_combine():
    """Summing in the experts' dtype instead of float32 (one rounding per term) is caught."""
    moe = _moe(mx.bfloat16, 4, 1, seed=5)
    x = mx.random.normal((2, 13, 64), key=mx.random.key(6)).astype(mx.bfloat16)
    y, scores, shared = _parts(moe, x)
    wrong = (y * scores[..., None].astype(y.dtype)).sum(axis=-2) + shared
    assert not mx.array_equal(wrong, moe(x)).item()


@pytest.mark.cuda
@pytest.mark.parametrize("lead", [(1, 1), (2, 13), (5,)])
@pytest.mark.parametrize("k,d", [(4, 2048), (3, 123), (1, 64)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("with_shared", [True, False])
@pytest.mark.parametrize(
    "scores_in_t", [False, True], ids=["scores_f32", "scores_in_t"]
)  # a gate module's float32, a softmax router's T
def test_cuda_kernel_is_bitwise_the_reference(lead, k, d, dtype, with_shared, scores_in_t):
    seed = d * 7 + k
    y = (mx.random.normal((*lead, k, d), key=mx.random.key(seed)) * 3).astype(dtype)
    scores = mx.random.uniform(shape=(*lead, k), key=mx.random.key(seed + 1)) * 1.8
    scores = scores.astype(dtype) if scores_in_t else scores
    shared = mx.random.normal((*lead, d), key=mx.random.key(seed + 2)).astype(dtype) if with_shared else None
    # Poisoned output: an element the kernel leaves unwritten stays NaN and fails array_equal.
    got = moe_combine.run_kernel("cuda", y, scores, shared, init_value=float("nan"))
    want = reference(y, scores, shared)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert mx.array_equal(got, want).item()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,bits", KINDS)
@pytest.mark.parametrize("shared_experts", [1, None])
def test_cuda_kernel_is_bitwise_mlx_lm_moe_block(dtype, bits, shared_experts):
    moe = _moe(dtype, bits, shared_experts, seed=3)
    x = mx.random.normal((1, 1, 64), key=mx.random.key(4)).astype(dtype)
    got = moe_combine.run_kernel("cuda", *_parts(moe, x), init_value=float("nan"))
    assert mx.array_equal(got, moe(x)).item()


@pytest.mark.cuda
def test_cuda_kernel_is_what_runs():
    assert moe_combine.plan("cuda").path == "kernel", moe_combine.plan("cuda").reason
