"""qk_norm_rope on GLM-4.5's attention (mlx-lm `glm4_moe`): the projections' biases added in
the kernel, q/k norms optional (`use_qk_norm`; GLM-4.5-Air has none), and a partial RoPE
(`partial_rotary_factor` 0.5: the first half of each head rotated, the rest copied); and on
gpt-oss's: biases, no norms, YaRN's rope (its frequencies in the table, its input scale).

CPU: the reference is mlx-lm's own Attention (its biases, norms and rope, as its __call__
applies them after the projections' matmuls), not a copy of itself; the Metal body through
the emulation against a float32 truth. `cuda` tests: bitwise stock on the GPU, poisoned."""

import mlx.core as mx
import pytest
from mlx_lm.models import glm4_moe
from mlx_lm.models.rope_utils import initialize_rope

from zmlx.kernels import metal_emu
from zmlx.kernels.glm47_rope import rope_table
from zmlx.kernels.qk_norm_rope import inputs, launch, qk_norm_rope, reference

DTYPES = [mx.bfloat16, mx.float16, mx.float32]
AIR = (96, 8, 128)  # GLM-4.5-Air: 96 query heads over 8 key heads of 128, half of each rotated


def _attention(heads, kv_heads, d, dtype, seed, *, qk_norm, partial=0.5):
    """mlx-lm's glm4_moe Attention with biased projections; its biases (and norms) random."""
    args = glm4_moe.ModelArgs(
        model_type="glm4_moe",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=131072,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        num_attention_heads=heads,
        n_group=1,
        head_dim=d,
        topk_group=1,
        n_shared_experts=1,
        n_routed_experts=4,
        routed_scaling_factor=1.0,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        num_hidden_layers=1,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5,
        rope_theta=1_000_000.0,
        rope_scaling=None,
        use_qk_norm=qk_norm,
        tie_word_embeddings=False,
        attention_bias=True,
        partial_rotary_factor=partial,
    )
    attn = glm4_moe.Attention(args)
    keys = mx.random.split(mx.random.key(seed), 4)
    attn.q_proj.bias = 0.5 * mx.random.normal((heads * d,), key=keys[0])
    attn.k_proj.bias = 0.5 * mx.random.normal((kv_heads * d,), key=keys[1])
    if qk_norm:
        attn.q_norm.weight = 1 + 0.1 * mx.random.normal((d,), key=keys[2])
        attn.k_norm.weight = 1 + 0.1 * mx.random.normal((d,), key=keys[3])
    attn.set_dtype(dtype)
    return attn


def _stock(attn, q, kv, offset):
    """The Attention's __call__ from its projections' matmul outputs q and kv (keys first) at
    decode: `x + bias` (as its Linear/QuantizedLinear adds it), reshape, norms, transpose, rope."""
    b, n, _ = q.shape
    hk = attn.n_kv_heads
    d = q.shape[-1] // attn.n_heads
    queries = (q + attn.q_proj.bias).reshape(b, n, attn.n_heads, -1)
    keys = (kv[..., : hk * d] + attn.k_proj.bias).reshape(b, n, hk, -1)
    if attn.use_qk_norm:
        queries, keys = attn.q_norm(queries), attn.k_norm(keys)
    queries, keys = queries.transpose(0, 2, 1, 3), keys.transpose(0, 2, 1, 3)
    return attn.rope(queries, offset=offset), attn.rope(keys, offset=offset)


def _case(b, heads, kv_heads, d, dtype, seed, offset, qk_norm):
    attn = _attention(heads, kv_heads, d, dtype, seed, qk_norm=qk_norm)
    keys = mx.random.split(mx.random.key(seed + 1), 2)
    q = mx.random.normal((b, 1, heads * d), key=keys[0]).astype(dtype)
    kv = mx.random.normal((b, 1, 2 * kv_heads * d), key=keys[1]).astype(dtype)
    rope = attn.rope
    norms = (attn.q_norm.weight, attn.k_norm.weight) if qk_norm else (None, None)
    eps = attn.q_norm.eps if qk_norm else None
    kw = dict(
        heads=heads,
        kv_heads=kv_heads,
        eps_q=eps,
        eps_k=eps,
        base=rope.base,
        rope_scale=rope.scale,
        rope_dims=rope.dims,
    )
    table = rope_table(rope.dims, rope.base, rope.scale, offset + 1)
    return attn, (q, kv, *norms, table, offset, attn.q_proj.bias, attn.k_proj.bias), kw


def _check_bitwise(got, want, dtype):
    for name, g, w in zip(("q", "k"), got, want):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape, name
        assert mx.array_equal(g, w).item(), (name, mx.abs(g.astype(mx.float32) - w).max().item())


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 257])
def test_reference_is_mlx_lm_modules(qk_norm, b, dtype, offset):
    attn, args, kw = _case(b, 5, 3, 128, dtype, 7 + offset, offset, qk_norm)
    assert attn.rope.dims == 64 and not attn.rope.traditional
    _check_bitwise(reference(*args, **kw), _stock(attn, args[0], args[1], offset), dtype)


def test_the_bias_and_the_unrotated_half_matter():
    attn, args, kw = _case(1, 5, 3, 128, mx.float32, 3, 17, False)
    q, k = reference(*args, **kw)
    no_bias = reference(*args[:6], **kw)
    assert not mx.array_equal(q, no_bias[0]).item() and not mx.array_equal(k, no_bias[1]).item()
    # dims 64.. are the biased inputs, copied
    want = (args[0] + args[6]).reshape(1, 5, 1, 128)[..., 64:]
    assert mx.array_equal(q[..., 64:], want).item()


def test_launch_takes_glm45_air_at_decode():
    args, kw = _case(1, *AIR, mx.bfloat16, 1, 4095, False)[1:]
    spec = launch("cuda", *args, **kw)
    template = dict(spec.template)
    assert (template["NORM"], template["BIAS"], template["RD"], template["D"]) == (0, 1, 64, 128)
    assert spec.grid == (104 * 64, 1, 1) and spec.inputs[6].shape == (1, 64)
    assert spec.inputs[2] is args[4] and spec.inputs[4] is args[6]  # the table in the norms' slots
    assert "table" in launch("cuda", *args[:4], rope_table(128, 1e6, 1.0, 4096), *args[5:], **kw).reason


EMU_CASES = [  # (batch, heads, kv_heads, head_dim, norm, bias, rope_dims)
    (1, 5, 3, 128, False, True, 64),  # GLM-4.5-Air's head: biases, no norm, half rotated
    (2, 4, 2, 64, True, True, 32),  # GLM-4.5 with qk norms, two tokens
    (1, 3, 1, 6, False, False, 2),  # one pair rotated, four copied
    (1, 2, 2, 128, True, False, 128),  # Qwen3's head, as test_qk_norm_rope's
]


def _f32(q, kv, qn, kn, table, offset, qb=None, kb=None, **kw):
    cast = [None if a is None else a.astype(mx.float32) for a in (q, kv, qn, kn, qb, kb)]
    return reference(*cast[:4], table, offset, *cast[4:], **kw)


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("case", EMU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, case, dtype):
    b, heads, kv_heads, d, norm, bias, rd = case
    args, kw = inputs(b, heads, kv_heads, d, dtype, d + heads, norm=norm, bias=bias, rope_dims=rd)
    got = metal_emu.run(qk_norm_rope, *args, workdir=tmp_path_factory.getbasetemp(), **kw)  # poisoned NaN
    stock, truth = reference(*args, **kw), _f32(*args, **kw)
    for i in range(2):
        assert got[i].dtype == dtype and got[i].shape == stock[i].shape
        assert not mx.isnan(got[i]).any().item()  # every element written, the copied ones too
        want, bar = close_bar(lambda *a, **k: stock[i], lambda *a, **k: truth[i], args, kw, dtype)
        assert mx.abs(got[i].astype(mx.float32) - want).max().item() <= bar


@pytest.mark.cuda
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 4095])
def test_cuda_kernel_is_bitwise_mlx_lm(qk_norm, dtype, offset):
    attn, args, kw = _case(1, *AIR, dtype, 5 + offset, offset, qk_norm)
    got = qk_norm_rope.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    _check_bitwise(got, _stock(attn, args[0], args[1], offset), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("case", EMU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_is_bitwise_the_reference(case, dtype):
    b, heads, kv_heads, d, norm, bias, rd = case
    args, kw = inputs(b, heads, kv_heads, d, dtype, d + heads, norm=norm, bias=bias, rope_dims=rd)
    got = qk_norm_rope.run_kernel("cuda", *args, init_value=float("nan"), **kw)
    _check_bitwise(got, reference(*args, **kw), dtype)


# gpt-oss-20b's rope: YaRN over the 64-wide head (mscale 1 + 0.1 ln 32 scales the input)
OSS_YARN = dict(
    rope_type="yarn",
    factor=32.0,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=False,
    original_max_position_embeddings=4096,
)


def _oss_case(b, heads, kv_heads, d, dtype, seed, offset):
    """gpt-oss's rope module (mlx-lm's initialize_rope, as its AttentionBlock makes it), random
    biases, and the kernel's (args, kwargs); stock: `x + bias`, reshape, swapaxes, the rope."""
    rope = initialize_rope(
        d, 150000, traditional=False, scaling_config=OSS_YARN, max_position_embeddings=131072
    )
    keys = mx.random.split(mx.random.key(seed), 4)
    q = mx.random.normal((b, 1, heads * d), key=keys[0]).astype(dtype)
    kv = mx.random.normal((b, 1, 2 * kv_heads * d), key=keys[1]).astype(dtype)
    qb = (0.5 * mx.random.normal((heads * d,), key=keys[2])).astype(dtype)
    kb = (0.5 * mx.random.normal((kv_heads * d,), key=keys[3])).astype(dtype)
    kw = dict(
        heads=heads,
        kv_heads=kv_heads,
        eps_q=None,
        eps_k=None,
        base=None,
        rope_scale=1.0,
        rope_dims=rope.dims,
        freqs=rope._freqs,
        mscale=rope.mscale,
    )
    table = rope_table(rope.dims, None, 1.0, offset + 1, freqs=rope._freqs)
    stock_q = rope((q + qb).reshape(b, 1, heads, d).swapaxes(1, 2), offset=offset)
    stock_k = rope((kv[..., : kv_heads * d] + kb).reshape(b, 1, kv_heads, d).swapaxes(1, 2), offset=offset)
    return (stock_q, stock_k), (q, kv, None, None, table, offset, qb, kb), kw


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 257])
def test_gpt_oss_reference_is_mlx_lm_modules(b, dtype, offset):
    stock, args, kw = _oss_case(b, 5, 3, 64, dtype, 11 + offset, offset)
    assert kw["mscale"] != 1.0
    _check_bitwise(reference(*args, **kw), stock, dtype)


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt_oss_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, dtype):
    stock, args, kw = _oss_case(1, 5, 3, 64, dtype, 5, 257)
    got = metal_emu.run(qk_norm_rope, *args, workdir=tmp_path_factory.getbasetemp(), **kw)  # poisoned NaN
    truth = _f32(*args, **kw)
    for i in range(2):
        assert got[i].dtype == dtype and not mx.isnan(got[i]).any().item()
        want, bar = close_bar(lambda *a, **k: stock[i], lambda *a, **k: truth[i], args, kw, dtype)
        assert mx.abs(got[i].astype(mx.float32) - want).max().item() <= bar


def test_gpt_oss_launch_scales_the_input():
    _, args, kw = _oss_case(1, 64, 8, 64, mx.bfloat16, 1, 4095)
    template = dict(launch("cuda", *args, **kw).template)
    assert template["MSCALE_BITS"] != 0x3F800000 and (template["NORM"], template["BIAS"]) == (0, 1)
    assert dict(launch("cuda", *args, **{**kw, "mscale": 1.0}).template)["MSCALE_BITS"] == 0x3F800000


@pytest.mark.cuda
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 4095])
def test_gpt_oss_cuda_kernel_is_bitwise_mlx_lm(b, dtype, offset):
    """gpt-oss-20b's heads (64 over 8 of 64), YaRN's rope, the biases."""
    stock, args, kw = _oss_case(b, 64, 8, 64, dtype, 13 + offset, offset)
    got = qk_norm_rope.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    _check_bitwise(got, stock, dtype)
