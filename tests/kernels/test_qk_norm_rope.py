"""qk_norm_rope: qwen3_moe's per-head q_norm / k_norm and the RoPE of queries and keys, in one launch.

CPU: the reference is mlx-lm's own modules (a qwen3_moe Attention's q_norm, k_norm and rope, as
its __call__ applies them at decode), not a copy of itself. The Metal body through the
emulation: as close to a float32 truth as stock is. `cuda` tests: bitwise stock on the GPU,
outputs poisoned."""

import mlx.core as mx
import pytest
from mlx_lm.models import qwen3_moe

from zmlx.kernels import metal_emu
from zmlx.kernels.core import Launch
from zmlx.kernels.glm47_rope import rope_table
from zmlx.kernels.qk_norm_rope import inputs, launch, qk_norm_rope, reference

DTYPES = [mx.bfloat16, mx.float16, mx.float32]
QWEN3_30B = (32, 4, 128)  # Qwen3-30B-A3B: 32 query heads over 4 key heads of 128 (eps 1e-6, base 1e6)
ODD = [(5, 3, 128), (4, 2, 64)]  # (heads, kv_heads, head_dim): odd head counts, a narrower head


def _attention(heads, kv_heads, d, dtype, seed, *, eps=1e-6, base=1_000_000.0):
    """mlx-lm's qwen3_moe Attention, its q_norm and k_norm weights random (around 1)."""
    args = qwen3_moe.ModelArgs(
        model_type="qwen3_moe",
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=heads,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=16,
        rms_norm_eps=eps,
        vocab_size=64,
        num_key_value_heads=kv_heads,
        head_dim=d,
        rope_theta=base,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
        norm_topk_prob=True,
    )
    attn = qwen3_moe.Attention(args, 0)
    keys = mx.random.split(mx.random.key(seed), 2)
    attn.q_norm.weight = 1 + 0.1 * mx.random.normal((d,), key=keys[0])
    attn.k_norm.weight = 1 + 0.1 * mx.random.normal((d,), key=keys[1])
    attn.set_dtype(dtype)
    return attn


def _stock(attn, q, kv, offset):
    """What the Attention's __call__ does to its projections' q and k at decode (cache.offset)."""
    b, n, _ = q.shape
    hk, d = attn.n_kv_heads, attn.q_norm.weight.shape[0]
    queries = attn.q_norm(q.reshape(b, n, attn.n_heads, -1)).transpose(0, 2, 1, 3)
    keys = attn.k_norm(kv[..., : hk * d].reshape(b, n, hk, -1)).transpose(0, 2, 1, 3)
    return attn.rope(queries, offset=offset), attn.rope(keys, offset=offset)


def _case(b, heads, kv_heads, d, dtype, seed, offset):
    """An Attention, and the kernel's (args, kwargs) for random q and kv read from its modules."""
    attn = _attention(heads, kv_heads, d, dtype, seed)
    keys = mx.random.split(mx.random.key(seed + 1), 2)
    q = mx.random.normal((b, 1, heads * d), key=keys[0]).astype(dtype)
    kv = mx.random.normal((b, 1, 2 * kv_heads * d), key=keys[1]).astype(dtype)  # keys, then values
    kw = dict(
        heads=heads,
        kv_heads=kv_heads,
        eps_q=attn.q_norm.eps,
        eps_k=attn.k_norm.eps,
        base=attn.rope.base,
        rope_scale=attn.rope.scale,
    )
    pos = offset if isinstance(offset, int) else offset.item()
    table = rope_table(d, attn.rope.base, attn.rope.scale, pos + 1)
    return attn, (q, kv, attn.q_norm.weight, attn.k_norm.weight, table, offset), kw


def _check_bitwise(got, want, dtype):
    for name, g, w in zip(("q", "k"), got, want):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape, name
        assert mx.array_equal(g, w).item(), (name, mx.abs(g.astype(mx.float32) - w).max().item())


@pytest.mark.parametrize("heads,kv_heads,d", ODD)
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 17, 257])
def test_reference_is_mlx_lm_modules(heads, kv_heads, d, b, dtype, offset):
    attn, args, kw = _case(b, heads, kv_heads, d, dtype, 10 * heads + d + offset, offset)
    got = reference(*args, **kw)
    _check_bitwise(got, _stock(attn, args[0], args[1], offset), dtype)
    assert got[0].shape == (b, heads, 1, d) and got[1].shape == (b, kv_heads, 1, d)


def test_reference_takes_an_int32_array_offset():
    """mlx-lm's cache offset may be an int32 scalar array: the same rotation as its int."""
    offset = mx.array(17, dtype=mx.int32)
    attn, args, kw = _case(2, 5, 3, 128, mx.bfloat16, 3, offset)
    got = reference(*args, **kw)
    _check_bitwise(got, _stock(attn, args[0], args[1], offset), mx.bfloat16)
    _check_bitwise(got, reference(*args[:5], 17, **kw), mx.bfloat16)


def test_the_cases_are_not_trivial():
    """The norms' weights and the rotation matter: another offset or swapped weights differ."""
    attn, args, kw = _case(1, 5, 3, 128, mx.float32, 1, 17)
    q, kv, qn, kn, table, _ = args
    want = reference(*args, **kw)
    assert not any(
        mx.array_equal(a, b).item() for a, b in zip(want, reference(q, kv, qn, kn, table, 18, **kw))
    )
    assert not any(
        mx.array_equal(a, b).item() for a, b in zip(want, reference(q, kv, kn, qn, table, 17, **kw))
    )


def test_launch_says_why_it_takes_the_reference():
    args, kw = qk_norm_rope.example()
    q, kv, qn, kn, t, pos = args
    assert all(isinstance(launch(backend, *args, **kw), Launch) for backend in ("cuda", "metal"))
    f32 = [a.astype(mx.float32) for a in (q, kv, qn, kn)]
    assert "one float dtype" in launch("cuda", q, f32[1], qn, kn, t, pos, **kw).reason
    assert "one float dtype" in launch("cuda", q, kv, f32[2], kn, t, pos, **kw).reason
    assert "one float dtype" in launch("cuda", q, kv, qn, f32[3], t, pos, **kw).reason
    ints = [a.astype(mx.int32) for a in (q, kv, qn, kn)]
    assert "one float dtype" in launch("cuda", *ints, t, pos, **kw).reason
    assert "(128,) needed" in launch("cuda", q, kv, qn[:127], kn[:127], t, pos, **kw).reason
    assert "(128,) needed" in launch("cuda", q, kv, qn, kn[:64], t, pos, **kw).reason
    assert "(128,) needed" in launch("cuda", q, kv, qn[None], kn, t, pos, **kw).reason
    assert "both norms or neither" in launch("cuda", q, kv, qn, None, t, pos, **kw).reason
    assert "both biases or neither" in launch("cuda", *args, q[0, 0], None, **kw).reason
    assert "(640,), (384,) needed" in launch("cuda", *args, q[0, 0, :64], kv[0, 0, :384], **kw).reason
    assert "with a rope of 7 dims" in launch("cuda", *args, **{**kw, "rope_dims": 7}).reason  # odd
    assert "with a rope of 130 dims" in launch("cuda", *args, **{**kw, "rope_dims": 130}).reason  # past D
    two = (mx.concatenate([q, q], axis=1), mx.concatenate([kv, kv], axis=1))
    assert "decode" in launch("cuda", *two, qn, kn, t, pos, **kw).reason
    assert "decode" in launch("cuda", q, kv[:, :0], qn, kn, t, pos, **kw).reason  # kv's tokens not q's
    assert "decode" in launch("cuda", q[0], kv[0], qn, kn, t, pos, **kw).reason  # 2-D
    assert "are not 6 and 3 heads" in launch("cuda", *args, **{**kw, "heads": 6}).reason
    assert "are not 5 and 7 heads" in launch("cuda", *args, **{**kw, "kv_heads": 7}).reason  # kv too short
    assert "are not 5 and 3 heads" in launch("cuda", q, kv[..., : 3 * 128 - 2], qn, kn, t, pos, **kw).reason
    for bad in (-1, 5.0, mx.array(5, dtype=mx.int32)):
        assert "one int position" in launch("cuda", q, kv, qn, kn, t, bad, **kw).reason, bad
    assert "does not cover position 257" in launch("cuda", *args[:4], t[:257], pos, **kw).reason
    assert isinstance(launch("cuda", *args[:4], t[:258], pos, **kw), Launch)  # the last row is 257's
    assert "does not cover" in launch("cuda", *args[:4], t.astype(mx.bfloat16), pos, **kw).reason
    assert "does not cover" in launch("cuda", *args[:4], t[:, :64], pos, **kw).reason  # another width
    assert "does not cover" in launch("cuda", *args[:4], t[pos], pos, **kw).reason  # one row, 1-D


def test_launch_refuses_heads_too_wide():
    wide, wkw = inputs(1, 1, 1, 4096, mx.bfloat16, 1, offset=0)
    assert "needs 2048 threads" in launch("cuda", *wide, **wkw).reason  # one thread per pair
    past, pkw = inputs(1, 1, 1, 4098, mx.bfloat16, 1, offset=0)
    assert "4096" in launch("metal", *past, **pkw).reason  # MLX's Metal rms_norm loops there


@pytest.mark.parametrize("b", [1, 2])
def test_qwen3_geometry(b):
    """Qwen3-30B-A3B at decode: one group of 64 threads per head (64 pairs of 128; MLX's
    rms_norm's 64 threads of 8 bf16), 36 heads per token; the position's table row a view."""
    heads, kv_heads, d = QWEN3_30B
    args, kw = inputs(b, heads, kv_heads, d, mx.bfloat16, 2, offset=4095)
    spec = launch("cuda", *args, **kw)
    assert spec.threadgroup == (64, 1, 1) and spec.grid == (b * 36 * 64, 1, 1)
    assert spec.output_shapes == [(b, 32, 1, 128), (b, 4, 1, 128)]
    assert spec.output_dtypes == [mx.bfloat16, mx.bfloat16]
    assert spec.inputs[6].shape == (1, 128) and mx.array_equal(spec.inputs[6][0], args[4][4095]).item()
    template = dict(spec.template)
    assert (template["H"], template["HK"], template["D"], template["KVW"]) == (32, 4, 128, 1024)
    assert (template["BLOCK"], template["CHUNKS"], template["NR"]) == (64, 1, 8)
    f32 = launch("cuda", *inputs(b, heads, kv_heads, d, mx.float32, 2)[0], **kw)
    assert f32.threadgroup == (64, 1, 1) and dict(f32.template)["NR"] == 4
    metal = launch("metal", *args, **kw)  # MLX's Metal rms_norm: 32 threads of 4; 64 rotate
    assert metal.threadgroup == (64, 1, 1) and dict(metal.template)["BLOCK"] == 32


def _f32(q, kv, q_norm_w, k_norm_w, table, offset, **kw):
    """The float32 truth: the reference with every input cast to float32."""
    return reference(*(a.astype(mx.float32) for a in (q, kv, q_norm_w, k_norm_w)), table, offset, **kw)


EMU_CASES = [  # (batch, heads, kv_heads, head_dim)
    (1, 5, 3, 128),  # Qwen3's head width, odd head counts
    (2, 4, 2, 64),  # two tokens
    (1, 3, 1, 6),  # 3 pairs: most threads neither norm nor rotate
    (1, 2, 2, 256),  # 128 pairs: more threads rotate than norm
]


def _emu_inputs(b, heads, kv_heads, d, dtype, scale, offset):
    """q and kv times `scale` (a power of 2): at 2**-10 the mean square is near eps (1e-6), so a
    kernel that dropped eps, or took eps_q for eps_k, would be off by a large factor."""
    args, kw = inputs(b, heads, kv_heads, d, dtype, 7 * d + heads, offset=offset)
    return (args[0] * scale, args[1] * scale, *args[2:]), dict(kw, eps_k=2e-6)


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("b,heads,kv_heads,d", EMU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 2**-10])
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, b, heads, kv_heads, d, dtype, scale):
    offset = 257 if scale == 1.0 else 3
    args, kw = _emu_inputs(b, heads, kv_heads, d, dtype, scale, offset)
    got = metal_emu.run(qk_norm_rope, *args, workdir=tmp_path_factory.getbasetemp(), **kw)  # poisoned NaN
    stock, truth = reference(*args, **kw), _f32(*args, **kw)
    for i, (name, h) in enumerate((("q", heads), ("k", kv_heads))):
        assert got[i].dtype == dtype and got[i].shape == stock[i].shape == (b, h, 1, d), name
        assert not mx.isnan(got[i]).any().item(), name  # every element written
        want, bar = close_bar(lambda *a, **k: stock[i], lambda *a, **k: truth[i], args, kw, dtype)
        assert mx.abs(got[i].astype(mx.float32) - want).max().item() <= bar, name


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_metal_body_with_a_wrong_eps_is_caught(tmp_path_factory, close_bar):
    """The comparison above sees k normed with q's eps (at 2**-10, where eps matters)."""
    args, kw = _emu_inputs(1, 5, 3, 128, mx.float32, 2**-10, 3)
    got = metal_emu.run(
        qk_norm_rope, *args, workdir=tmp_path_factory.getbasetemp(), **dict(kw, eps_k=kw["eps_q"])
    )
    stock, truth = reference(*args, **kw), _f32(*args, **kw)
    want, bar = close_bar(lambda *a, **k: stock[1], lambda *a, **k: truth[1], args, kw, mx.float32)
    assert mx.abs(got[1].astype(mx.float32) - want).max().item() > bar


@pytest.mark.cuda
@pytest.mark.parametrize("b,heads,kv_heads,d", [(1, *QWEN3_30B), (2, *QWEN3_30B)] + [(1, *s) for s in ODD])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 4095])
def test_cuda_kernel_is_bitwise_mlx_lm(b, heads, kv_heads, d, dtype, offset):
    attn, args, kw = _case(b, heads, kv_heads, d, dtype, 3 * heads + d + offset, offset)
    assert (attn.q_norm.eps, attn.rope.base) == (1e-6, 1e6)
    want = _stock(attn, args[0], args[1], offset)
    got = qk_norm_rope.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    _check_bitwise(got, want, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("b,heads,kv_heads,d", EMU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 2**-10])
def test_cuda_kernel_is_bitwise_the_reference(b, heads, kv_heads, d, dtype, scale):
    args, kw = _emu_inputs(b, heads, kv_heads, d, dtype, scale, 257 if scale == 1.0 else 3)
    got = qk_norm_rope.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    _check_bitwise(got, reference(*args, **kw), dtype)


@pytest.mark.cuda
def test_cuda_kernel_is_what_runs():
    assert qk_norm_rope.plan("cuda").path == "kernel", qk_norm_rope.plan("cuda").reason
