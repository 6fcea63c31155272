"""softmax_router's reference is mlx-lm's own routing (Qwen3MoeSparseMoeBlock,
MixtralSparseMoeBlock and gpt-oss's MLPBlock, run here with a spy in place of the gate and the
experts); its Metal
body, through the g++ emulation, chooses the GPU's experts in the GPU's order; its CUDA body
compiles (tests/kernels/test_cuda_compile.py) and is bitwise stock on the GPU (`cuda`)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import gpt_oss, mixtral, qwen3_moe
from toolchain_marks import needs_nvrtc

from zmlx.kernels import cuda_check, metal_emu
from zmlx.kernels.softmax_router import launch, reference, softmax_router

DTYPES = [mx.float32, mx.bfloat16, mx.float16]
FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]
SHAPES = [  # (tokens shape, experts, top_k)
    ((1, 1), 128, 8),  # Qwen3-30B-A3B decode
    ((2, 9), 128, 8),  # prompt, batch 2
    ((1, 1), 8, 2),  # Mixtral decode
    ((2, 5), 8, 2),
    ((3, 1), 60, 4),  # Qwen1.5-MoE-sized, odd
    ((1, 3), 60, 8),
    ((2, 1), 128, 4),
    ((1, 2), 7, 3),  # odd
    ((1, 1), 8, 8),  # every expert
    ((1, 1), 32, 4),  # gpt-oss-20b decode
    ((2, 3), 128, 4),  # gpt-oss-120b
]


class _Gate(nn.Module):
    """The gate of a spied block: its input is the logits."""

    def __call__(self, x):
        return x


class _Experts(nn.Module):
    """switch_mlp of a spied block: records the indices and returns the identity per token,
    so that the block's weighted sum over the k returns the scores themselves."""

    def __call__(self, x, inds):
        self.inds = inds
        k = inds.shape[-1]
        return mx.broadcast_to(mx.eye(k, dtype=x.dtype), (*inds.shape, k))


def _block(family: str, experts: int, top_k: int, norm: bool = True):
    if family == "qwen3_moe":
        args = qwen3_moe.ModelArgs(
            model_type="qwen3_moe", hidden_size=16, num_hidden_layers=1, intermediate_size=16,
            num_attention_heads=1, num_experts=experts, num_experts_per_tok=top_k,
            decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=8, rms_norm_eps=1e-6,
            vocab_size=8, num_key_value_heads=1, head_dim=16, rope_theta=1e4,
            tie_word_embeddings=False, max_position_embeddings=64, norm_topk_prob=norm,
        )  # fmt: skip
        block = qwen3_moe.Qwen3MoeSparseMoeBlock(args)
    elif family == "gpt_oss":
        args = gpt_oss.ModelArgs(
            hidden_size=16, intermediate_size=16, num_local_experts=experts, num_experts_per_tok=top_k
        )
        block = gpt_oss.MLPBlock(args)
        block.router, block.experts = _Gate(), _Experts()
        return block
    else:
        args = mixtral.ModelArgs(
            model_type="mixtral", vocab_size=8, hidden_size=16, intermediate_size=16,
            num_hidden_layers=1, num_attention_heads=1, num_experts_per_tok=top_k,
            num_key_value_heads=1, num_local_experts=experts,
        )  # fmt: skip
        block = mixtral.MixtralSparseMoeBlock(args)
    block.gate, block.switch_mlp = _Gate(), _Experts()
    return block


def _stock(family, gates, top_k, norm=True):
    """mlx-lm's block routing these logits: (inds, scores)."""
    block = _block(family, gates.shape[-1], top_k, norm)
    scores = block(gates)
    experts = block.experts if family == "gpt_oss" else block.switch_mlp
    return experts.inds, scores


def _gates(shape, experts, dtype, seed, ties):
    gates = mx.random.normal((*shape, experts), key=mx.random.key(seed)) * 2
    if ties:  # coarse logits: many equal probabilities and logits
        gates = mx.round(gates * 2) / 2
    return gates.astype(dtype)


def _kw(family, top_k, norm=True):
    kw = dict(top_k=top_k, softmax_first=family == "qwen3_moe", norm_topk_prob=norm)
    return {**kw, "topk_last": True} if family == "gpt_oss" else kw


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape,experts,top_k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_reference_is_mlx_lm_routing(family, shape, experts, top_k, dtype, ties):
    gates = _gates(shape, experts, dtype, experts + top_k, ties)
    want_i, want_s = _stock(family, gates, top_k)
    got_i, got_s = reference(gates, **_kw(family, top_k))
    assert got_i.dtype == want_i.dtype and got_s.dtype == want_s.dtype == dtype
    assert mx.array_equal(got_i, want_i).item() and mx.array_equal(got_s, want_s).item()


@pytest.mark.parametrize("norm", [False, True])
def test_reference_follows_norm_topk_prob(norm):
    gates = _gates((2, 3), 60, mx.bfloat16, 3, False)
    want = _stock("qwen3_moe", gates, 4, norm)
    got = reference(gates, **_kw("qwen3_moe", 4, norm))
    assert all(mx.array_equal(a, b).item() for a, b in zip(got, want))
    other = reference(gates, **_kw("qwen3_moe", 4, not norm))[1]
    assert not mx.array_equal(other, want[1]).item()


# ---------------------------------------------------------------- the GPU's order


def _gpu_order(family, gates, top_k, norm=True):
    """The routing as MLX's GPU runs it, with argpartition replaced by a stable argsort (the
    order MLX's GPU argpartition, a stable merge sort, returns; MLX's CPU argpartition leaves
    the k in another order): Qwen3-MoE the last k of the ascending sort of the probabilities,
    Mixtral the first k of the ascending sort of -gates, gpt-oss the last k of the ascending
    sort of the gates. The softmax and sums are the CPU's."""
    if family == "qwen3_moe":
        p = mx.softmax(gates, axis=-1, precise=True)
        order = np.argsort(np.array(p.astype(mx.float32)), axis=-1, kind="stable")[..., -top_k:]
        inds = mx.array(order.astype(np.uint32))
        scores = mx.take_along_axis(p, inds, axis=-1)
        return inds, scores / mx.sum(scores, axis=-1, keepdims=True) if norm else scores
    if family == "gpt_oss":
        order = np.argsort(np.array(gates.astype(mx.float32)), axis=-1, kind="stable")[..., -top_k:]
    else:
        order = np.argsort(-np.array(gates.astype(mx.float32)), axis=-1, kind="stable")[..., :top_k]
    inds = mx.array(order.astype(np.uint32))
    return inds, mx.softmax(mx.take_along_axis(gates, inds, axis=-1), axis=-1, precise=True)


def _sorted(inds, scores):
    order = mx.argsort(inds, axis=-1)
    return mx.take_along_axis(inds, order, axis=-1), mx.take_along_axis(scores, order, axis=-1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape,experts,top_k", SHAPES)
def test_gpu_order_reference_chooses_stocks_experts(family, shape, experts, top_k):
    gates = _gates(shape, experts, mx.float32, 7 * experts + top_k, False)
    want_i, want_s = _sorted(*_stock(family, gates, top_k))
    got_i, got_s = _sorted(*_gpu_order(family, gates, top_k))
    assert mx.array_equal(want_i, got_i).item()
    assert mx.allclose(want_s, got_s, rtol=1e-6, atol=0).item()


def _exact_rows(experts, dtype):
    """Qwen3-MoE logits whose softmax is exact on any exp: 0 or -1000 (exp: 1 or 0), with a
    power of two of zeros per row (probabilities 1/n and 0, sums exact): ties everywhere, and
    fewer candidates than k in some rows (experts of probability 0 are chosen)."""
    rows = []
    for r, n in enumerate((1, 2, 4, 8, 16, 32)):
        n = min(n, experts)
        chosen = set(mx.random.permutation(experts, key=mx.random.key(r))[:n].tolist())
        rows.append(mx.array([0.0 if i in chosen else -1000.0 for i in range(experts)]))
    return mx.stack(rows).astype(dtype)


needs_gxx = pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
EMU_SHAPES = [((1, 1), 128, 8), ((2, 5), 8, 2), ((3, 1), 60, 4), ((1, 2), 7, 3), ((2, 1), 128, 16)]


@needs_gxx
@pytest.mark.parametrize("experts,top_k", [(128, 8), (60, 4), (8, 2), (7, 3), (128, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
def test_metal_body_breaks_ties_like_the_gpu(tmp_path_factory, experts, top_k, dtype, norm):
    """Softmax values exact on any exp: the experts, their order and the scores bitwise."""
    if 32 * 16 // dtype.size < experts:
        pytest.skip("more experts than one warp's softmax")
    gates = _exact_rows(experts, dtype)
    kw = _kw("qwen3_moe", top_k, norm)
    inds, scores = metal_emu.run(softmax_router, gates, workdir=tmp_path_factory.getbasetemp(), **kw)
    want_i, want_s = _gpu_order("qwen3_moe", gates, top_k, norm)
    assert inds.dtype == mx.uint32 and scores.dtype == dtype
    assert mx.array_equal(inds, want_i).item() and mx.array_equal(scores, want_s).item()


@needs_gxx
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("shape,experts,top_k", EMU_SHAPES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("ties", [False, True])
def test_metal_body_routes_on_the_logits_like_the_gpu(
    tmp_path_factory, family, shape, experts, top_k, dtype, ties
):
    """Mixtral and gpt-oss choose on the logits (no exp): the experts in the GPU's order
    exactly (gpt-oss's the last k of the ascending sort, Mixtral's the first of the sort of
    -gates); the softmax of the k up to the exp (the emulation's is std::exp, the CPU's MLX's)."""
    if 32 * 16 // dtype.size < experts:
        pytest.skip("more experts than one warp's softmax")
    gates = _gates(shape, experts, dtype, 3 * experts + top_k, ties)
    kw = _kw(family, top_k)
    inds, scores = metal_emu.run(softmax_router, gates, workdir=tmp_path_factory.getbasetemp(), **kw)
    want_i, want_s = _gpu_order(family, gates, top_k)
    assert mx.array_equal(inds, want_i).item()
    tol = 1e-6 if dtype == mx.float32 else 1e-2
    assert mx.allclose(scores, want_s, rtol=tol, atol=tol).item()


@needs_gxx
@pytest.mark.parametrize("experts,top_k", [(128, 4), (32, 4), (7, 3), (8, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_metal_body_routes_gpt_oss_ties_bitwise_like_the_gpu(tmp_path_factory, experts, top_k, dtype):
    """gpt-oss on logits 0 and -1000 (the softmax of the k exact on any exp, ties everywhere,
    fewer zeros than k in some rows): the experts, their order and the scores bitwise."""
    if 32 * 16 // dtype.size < experts:
        pytest.skip("more experts than one warp's softmax")
    gates = _exact_rows(experts, dtype)
    kw = _kw("gpt_oss", top_k)
    inds, scores = metal_emu.run(softmax_router, gates, workdir=tmp_path_factory.getbasetemp(), **kw)
    want_i, want_s = _gpu_order("gpt_oss", gates, top_k)
    assert inds.dtype == mx.uint32 and scores.dtype == dtype
    assert mx.array_equal(inds, want_i).item() and mx.array_equal(scores, want_s).item()
    if top_k < experts:  # Mixtral's convention on the same rows chooses the tied experts otherwise
        mixtral_i = _gpu_order("mixtral", gates, top_k)[0]
        assert not mx.array_equal(_sorted(inds, scores)[0], _sorted(mixtral_i, scores)[0]).item()


@needs_gxx
@pytest.mark.parametrize("experts,top_k", [(128, 8), (60, 4), (8, 2)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_metal_body_routes_qwen3_like_the_gpu(tmp_path_factory, experts, top_k, dtype):
    """Well separated logits (1/8 apart): the same experts in the GPU's order, scores close."""
    rows = [mx.random.permutation(experts, key=mx.random.key(experts + r)) for r in range(4)]
    gates = (mx.stack(rows).astype(mx.float32) / 8 - 4).astype(dtype)
    kw = _kw("qwen3_moe", top_k)
    inds, scores = metal_emu.run(softmax_router, gates, workdir=tmp_path_factory.getbasetemp(), **kw)
    want_i, want_s = _gpu_order("qwen3_moe", gates, top_k)
    assert mx.array_equal(inds, want_i).item()
    assert mx.allclose(scores, want_s, rtol=1e-2, atol=1e-3).item()


def test_launch_says_why_it_takes_the_reference():
    kw = dict(softmax_first=True, norm_topk_prob=True)
    assert "256 experts" in launch("cuda", mx.zeros((1, 300), mx.bfloat16), top_k=8, **kw).reason
    assert "128 experts" in launch("cuda", mx.zeros((1, 256)), top_k=8, **kw).reason
    assert "top-17" in launch("cuda", mx.zeros((1, 64), mx.bfloat16), top_k=17, **kw).reason
    assert "dimension" in launch("cuda", mx.zeros((64,), mx.bfloat16), top_k=4, **kw).reason
    spec = launch("cuda", mx.zeros((2, 3, 128), mx.bfloat16), top_k=8, **kw)
    assert ("N", 8) in spec.template and ("ROWS", 6) in spec.template and spec.grid == (6 * 32, 1, 1)
    mixtral = launch("cuda", mx.zeros((1, 8)), top_k=2, softmax_first=False).template
    assert ("NORM", False) in mixtral and ("LAST", False) in mixtral and ("LAST", True) in spec.template
    oss = launch("cuda", mx.zeros((1, 32)), top_k=4, softmax_first=False, topk_last=True).template
    assert ("LAST", True) in oss and ("SOFTMAX_FIRST", False) in oss


def test_reference_takes_the_families_top_k_conventions():
    """gpt-oss's top-k (the last k of the ascending sort) and Mixtral's (the first k of the
    sort of -gates) choose the same experts from distinct logits but in other orders; the
    default convention is Qwen3-MoE's with softmax_first, Mixtral's without."""
    gates = _gates((4, 3), 32, mx.float32, 5, False)
    oss = reference(gates, top_k=4, softmax_first=False, topk_last=True)
    mixtral = reference(gates, top_k=4, softmax_first=False)
    assert mx.array_equal(_sorted(*oss)[0], _sorted(*mixtral)[0]).item()
    assert not mx.array_equal(oss[0], mixtral[0]).item()
    assert all(mx.array_equal(a, b).item() for a, b in zip(mixtral, reference(gates, **_kw("mixtral", 4))))
    qwen = reference(gates, top_k=4, softmax_first=True, norm_topk_prob=True, topk_last=True)
    assert all(mx.array_equal(a, b).item() for a, b in zip(qwen, reference(gates, **_kw("qwen3_moe", 4))))


# ---------------------------------------------------------------- on the GPU


def _nan_rows(dtype):
    g = _gates((2,), 128, mx.float32, 9, True)
    return mx.where(mx.arange(128) % 37 == 5, float("nan"), g).astype(dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape,experts,top_k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_cuda_kernel_is_bitwise_stock(family, shape, experts, top_k, dtype, ties):
    if 32 * 16 // dtype.size < experts:
        pytest.skip("more experts than one warp's softmax")
    gates = _gates(shape, experts, dtype, 5 * experts + top_k, ties)
    want_i, want_s = _stock(family, gates, top_k)
    for poison in (float("nan"), 1e9):  # an unwritten index or score shows either way
        got_i, got_s = softmax_router.run_kernel("cuda", gates, init_value=poison, **_kw(family, top_k))
        assert got_i.dtype == want_i.dtype and got_s.dtype == want_s.dtype
        assert mx.array_equal(got_i, want_i).item() and mx.array_equal(got_s, want_s).item()


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_cuda_kernel_is_bitwise_stock_on_many_rows_and_exact_ties(family, dtype):
    """Many rows (every lane's max and sum differ: MLX's butterfly order shows), the exact-tie
    rows and rows with NaN logits."""
    gates = _gates((512,), 128, dtype, 11, False)
    for g in (gates, _exact_rows(128, dtype), _nan_rows(dtype)):
        want_i, want_s = _stock(family, g, 8)
        got_i, got_s = softmax_router.run_kernel("cuda", g, init_value=float("nan"), **_kw(family, 8))
        assert mx.array_equal(got_i, want_i).item()
        assert mx.array_equal(got_s, want_s, equal_nan=True).item()


@pytest.mark.cuda
def test_cuda_kernel_is_what_runs():
    assert softmax_router.plan("cuda").path == "kernel", softmax_router.plan("cuda").reason


# The router's bias in the kernel (gpt-oss's quantized router: its QuantizedLinear adds the bias
# to the matmul's gates in their dtype, then MLPBlock routes): `bias` is added first, rounded.


def _bias(experts, dtype, seed):
    return (mx.random.normal((experts,), key=mx.random.key(seed)) * 3).astype(dtype)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_with_a_bias_routes_the_biased_gates(family, dtype):
    gates, bias = _gates((2, 3), 32, dtype, 7, False), _bias(32, dtype, 8)
    want_i, want_s = _stock(family, gates + bias, 4)  # the QuantizedLinear's add, then the block
    got_i, got_s = reference(gates, bias, **_kw(family, 4))
    assert mx.array_equal(got_i, want_i).item() and mx.array_equal(got_s, want_s).item()


def test_launch_takes_a_bias_of_the_gates_dtype_and_width_only():
    gates = _gates((1, 1), 32, mx.bfloat16, 1, False)
    kw = _kw("gpt_oss", 4)
    spec = launch("cuda", gates, _bias(32, mx.bfloat16, 2), **kw)
    assert dict(spec.template)["BIAS"] is True and len(spec.inputs) == 2
    assert dict(launch("cuda", gates, **kw).template)["BIAS"] is False
    assert "(32,) in the gates' dtype" in launch("cuda", gates, _bias(32, mx.float32, 2), **kw).reason
    assert "(32,) in the gates' dtype" in launch("cuda", gates, _bias(16, mx.bfloat16, 2), **kw).reason


@needs_gxx
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_metal_body_adds_the_bias_before_routing(tmp_path_factory, family, dtype):
    """Rows whose top-k the bias changes: the body's experts are those of the biased gates, in
    the GPU's order, and the scores theirs (up to the exp)."""
    gates, bias = _gates((3, 1), 32, dtype, 21, False), _bias(32, dtype, 22)
    kw = _kw(family, 4)
    inds, scores = metal_emu.run(softmax_router, gates, bias, workdir=tmp_path_factory.getbasetemp(), **kw)
    want_i, want_s = _gpu_order(family, gates + bias, 4)
    assert not mx.array_equal(want_i, _gpu_order(family, gates, 4)[0]).item()  # the bias matters
    assert mx.array_equal(inds, want_i).item()
    tol = 1e-6 if dtype == mx.float32 else 1e-2
    assert mx.allclose(scores, want_s, rtol=tol, atol=tol).item()


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_with_a_bias_is_bitwise_stock(family, dtype):
    gates, bias = _gates((2, 5), 32, dtype, 31, False), _bias(32, dtype, 32)
    want_i, want_s = _stock(family, gates + bias, 4)
    for poison in (float("nan"), 1e9):
        got_i, got_s = softmax_router.run_kernel("cuda", gates, bias, init_value=poison, **_kw(family, 4))
        assert mx.array_equal(got_i, want_i).item() and mx.array_equal(got_s, want_s).item()


@needs_nvrtc
def test_the_cuda_body_with_a_bias_compiles():
    gates, bias = _gates((1, 1), 32, mx.bfloat16, 1, False), _bias(32, mx.bfloat16, 2)
    cuda_check.compile_launch(softmax_router, launch("cuda", gates, bias, **_kw("gpt_oss", 4)))
