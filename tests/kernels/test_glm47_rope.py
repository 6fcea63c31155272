"""glm47_rope: MLA decode RoPE of q_pe and k_pe (+ q_pe's scale), bitwise mx.fast.rope on the GPU."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import glm4_moe_lite

import zmlx
from zmlx.kernels import glm47_rope as mod
from zmlx.kernels import metal_emu
from zmlx.kernels.core import Launch
from zmlx.kernels.glm47_rope import MIN_TABLE_ROWS, glm47_rope, launch, reference, rope_table

GLM = dict(heads=20, nope=192, rank=512)  # GLM-4.7-Flash: 20 heads, q head 256 = 192 + 64, kv rank 512
SHAPES = [  # (batch, heads, nope, rank)
    (1, 20, 192, 512),
    (2, 20, 192, 512),
    (1, 3, 16, 48),  # odd head count, short nope/rank
    (3, 1, 0, 0),  # no nope part at all
]
POSITIONS = [0, 1, 17, 4095, 32767]
DTYPES = [mx.bfloat16, mx.float16, mx.float32]


def _params(heads, nope):
    return dict(heads=heads, rope_dims=64, base=1_000_000.0, rope_scale=1.0, scale=(nope + 64) ** -0.5)


def _inputs(b, heads, nope, rank, dtype, seed):
    q = (mx.random.normal((b, 1, heads * (nope + 64)), key=mx.random.key(seed)) * 2).astype(dtype)
    kv = (mx.random.normal((b, 1, rank + 64), key=mx.random.key(seed + 1)) * 2).astype(dtype)
    return q, kv


def test_table_rows_are_what_fast_rope_rotates_with():
    """Rotating a row with the table (MLX ops, float32) equals mx.fast.rope of that row at
    that position, at short and long positions: on the CPU, whose rope is those ops. (On
    CUDA the rope kernel fuses the products into fmas; the `cuda` tests below show the
    table-driven kernel bitwise equal to it there.)"""
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        _check_table_rotation()
    finally:
        mx.set_default_device(before)


def _check_table_rotation():
    t = rope_table(64, 1_000_000.0, 1.0, 40000)
    x = mx.random.normal((1, 1, 1, 64), key=mx.random.key(3))
    for p in (0, 1, 17, 4095, 39999):
        c, s = t[p, 0::2], t[p, 1::2]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        mine = mx.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(x.shape)
        stock = mx.fast.rope(x, 64, traditional=True, base=1_000_000.0, scale=1.0, offset=p)
        assert mx.array_equal(mine, stock).item(), p


@pytest.mark.cuda
@pytest.mark.parametrize("dims", [2, 4, 64])
def test_cuda_table_rows_hold_their_positions_angles(dims):
    """Each row p of a table built on the GPU is (cos, sin) of p times its pair's frequency
    (float64 truth, float32 rounding). A rope of 2 dims once built its table from a view
    whose positions had stride 0, and MLX's CUDA rope gave row 257 position 7's angle."""
    t = rope_table(dims, 1_000_000.0, 1.0, 1000)
    rows = np.array(t[:1000].astype(mx.float32), dtype=np.float64)
    inv = 1_000_000.0 ** (-np.arange(dims // 2) * 2.0 / dims)
    angles = np.arange(1000)[:, None] * inv[None, :]
    assert np.abs(rows[:, 0::2] - np.cos(angles)).max() < 1e-4
    assert np.abs(rows[:, 1::2] - np.sin(angles)).max() < 1e-4


class _Cache:
    """A cache at `offset` that hands the new position's latent and k_pe straight back."""

    def __init__(self, offset):
        self.offset = offset

    def update_and_fetch(self, kv_latent, k_pe):
        return kv_latent, k_pe


def _attention(heads, nope, dtype, seed):
    """mlx-lm's MLA attention at a tiny size (rope head dim 64, as GLM-4.7-Flash), random weights."""
    args = glm4_moe_lite.ModelArgs(
        hidden_size=64,
        num_attention_heads=heads,
        q_lora_rank=32,
        kv_lora_rank=48,
        qk_rope_head_dim=64,
        qk_nope_head_dim=nope,
        v_head_dim=16,
    )
    mx.random.seed(seed)
    attn = glm4_moe_lite.Glm4MoeLiteAttention(args)
    attn.set_dtype(dtype)
    return attn


@pytest.mark.parametrize("heads,nope", [(3, 16), (1, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos", [0, 17, 4095])
def test_reference_is_mlx_lm_attention_rope(monkeypatch, heads, nope, dtype, pos):
    """mlx-lm's Glm4MoeLiteAttention at decode: its `self.rope` of q_pe and k_pe, and the
    `(q_pe * self.scale) @ k_pe^T` it hands to attention as the mask, from the reference's
    two outputs, bitwise."""
    attn = _attention(heads, nope, dtype, seed=pos + heads)
    roped, masks = [], []
    rope = attn.rope
    attn.rope = lambda x, offset: roped.append(rope(x, offset)) or roped[-1]

    def sdpa(q, k, v, cache, scale, mask):
        masks.append(mask)
        return mx.zeros((*q.shape[:-1], v.shape[-1]), q.dtype)

    monkeypatch.setattr(glm4_moe_lite, "scaled_dot_product_attention", sdpa)
    x = mx.random.normal((2, 1, 64), key=mx.random.key(pos)).astype(dtype)
    attn(x, cache=_Cache(pos))  # mlx-lm's __call__
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    kv = attn.kv_a_proj_with_mqa(x)
    t = rope_table(64, rope.base, rope.scale, pos + 1)
    q_pe, k_pe = reference(
        q, kv, t, pos, heads=heads, rope_dims=64, base=rope.base, rope_scale=rope.scale, scale=attn.scale
    )
    assert q_pe.dtype == k_pe.dtype == dtype
    assert mx.array_equal(k_pe, roped[1]).item()
    assert mx.array_equal(q_pe, roped[0] * attn.scale).item()
    assert mx.array_equal(q_pe @ k_pe.swapaxes(-1, -2), masks[0]).item()


def test_table_grows_in_powers_of_two_and_is_shared():
    mod._TABLES.clear()
    a = rope_table(64, 10_000.0, 1.0, 1)
    assert a.shape == (MIN_TABLE_ROWS, 64) and a.dtype == mx.float32
    assert rope_table(64, 10_000.0, 1.0, MIN_TABLE_ROWS) is a  # still covered: the same array
    b = rope_table(64, 10_000.0, 1.0, MIN_TABLE_ROWS + 1)
    assert b.shape[0] == 2 * MIN_TABLE_ROWS
    assert rope_table(64, 10_000.0, 1.0, 5000).shape[0] == 8192
    assert mx.array_equal(rope_table(64, 10_000.0, 1.0, 5000)[:MIN_TABLE_ROWS], a).item()
    assert rope_table(64, 10_000.0, 2.0, 5).shape[0] == MIN_TABLE_ROWS  # other parameters: own table


def test_launch_says_why_it_takes_the_reference():
    kw = _params(3, 16)
    q, kv = _inputs(1, 3, 16, 48, mx.bfloat16, 1)
    t = rope_table(64, kw["base"], kw["rope_scale"], 10)
    assert isinstance(launch("cuda", q, kv, t, 5, **kw), Launch)
    two = (mx.concatenate([q, q], axis=1), mx.concatenate([kv, kv], axis=1))
    assert "decode" in launch("cuda", *two, t, 5, **kw).reason
    assert "one float dtype" in launch("cuda", q, kv.astype(mx.float32), t, 5, **kw).reason
    assert "one int position" in launch("cuda", q, kv, t, mx.array([5]), **kw).reason
    assert "does not cover" in launch("cuda", q, kv, t[:4], 5, **kw).reason
    assert "does not fit" in launch("cuda", q[..., :-1], kv, t, 5, **kw).reason


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("b,heads,nope,rank", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos", [0, 17, 4095])
def test_metal_body_matches_the_reference(tmp_path_factory, b, heads, nope, rank, dtype, pos):
    """Through the emulation (outputs poisoned with NaN): bitwise in float32, where MLX's CPU
    rope also rotates in float32; bf16/f16 within two roundings (the CPU rope rotates in
    those dtypes, the GPU kernels in float32)."""
    kw = _params(heads, nope)
    q, kv = _inputs(b, heads, nope, rank, dtype, pos + heads)
    t = rope_table(64, kw["base"], kw["rope_scale"], pos + 1)
    got = metal_emu.run(glm47_rope, q, kv, t, pos, **kw, workdir=tmp_path_factory.getbasetemp())
    want = reference(q, kv, t, pos, **kw)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape
        if dtype == mx.float32:
            assert mx.array_equal(g, w).item()
        else:
            tol = {mx.bfloat16: 2**-7, mx.float16: 2**-10}[dtype] * 4  # |values| <= ~8
            assert mx.allclose(g.astype(mx.float32), w.astype(mx.float32), rtol=2 * tol, atol=tol).item()


def test_a_wrong_rope_is_caught(tiny_q4, monkeypatch, decode_steps):
    """The patched model's comparison with stock must see a rope that is off by one position."""
    from zmlx.patch.patterns import glm47_rope as pattern_module

    model, _ = tiny_q4
    prompt = mx.array([[5, 6, 7, 8]])
    stock = decode_steps(model, prompt, 2)
    monkeypatch.setattr(
        pattern_module, "glm47_rope", lambda q, kv, t, offset, **kw: reference(q, kv, t, offset + 1, **kw)
    )
    zmlx.patch(model, patterns=["glm47_rope"])
    try:
        patched = decode_steps(model, prompt, 2)
    finally:
        zmlx.unpatch(model)
    assert mx.array_equal(stock[0], patched[0]).item()  # the prompt is stock's own path
    assert not all(mx.array_equal(s, p).item() for s, p in zip(stock, patched))


@pytest.mark.cuda
@pytest.mark.parametrize("b,heads,nope,rank", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos", POSITIONS + [131071])
def test_cuda_kernel_is_bitwise_stock(b, heads, nope, rank, dtype, pos):
    kw = _params(heads, nope)
    q, kv = _inputs(b, heads, nope, rank, dtype, pos + 7 * heads)
    t = rope_table(64, kw["base"], kw["rope_scale"], pos + 1)
    want = reference(q, kv, t, pos, **kw)
    got = glm47_rope.run_kernel("cuda", q, kv, t, pos, **kw, init_value=float("nan"))  # poisoned
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape
        assert mx.array_equal(g, w).item()


@pytest.mark.cuda
def test_cuda_kernel_is_what_runs():
    assert glm47_rope.plan("cuda").path == "kernel", glm47_rope.plan("cuda").reason


# ---------------------------------------------------------------- YaRN (DeepSeek-V3, Kimi-K2)

YARN = {  # rope_scaling -> rope_theta
    # DeepSeek-V3 / R1: mscale == mscale_all_dim, so the rope's mscale is 1 (no input multiply)
    "deepseek_v3": (
        dict(
            type="yarn",
            factor=40.0,
            mscale=1.0,
            mscale_all_dim=1.0,
            original_max_position_embeddings=4096,
            beta_fast=32,
            beta_slow=1,
        ),
        10000.0,
    ),
    # mscale_all_dim 0: the rope scales its input by 1 + 0.1 ln 32 (not a value of bf16 or f16)
    "mscale": (
        dict(
            type="yarn",
            factor=32.0,
            mscale=1.0,
            original_max_position_embeddings=4096,
            beta_fast=1,
            beta_slow=1,
        ),
        50000.0,
    ),
}
YARN_POSITIONS = [0, 1, 4095, 100000]


def _yarn_attention(name, heads, nope, dtype, seed):
    """mlx-lm's DeepseekV3Attention with the YaRN rope at a tiny size, random weights."""
    from mlx_lm.models import deepseek_v3

    scaling, theta = YARN[name]
    args = deepseek_v3.ModelArgs(
        model_type="deepseek_v3",
        hidden_size=64,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        q_lora_rank=32,
        kv_lora_rank=48,
        qk_rope_head_dim=64,
        qk_nope_head_dim=nope,
        v_head_dim=16,
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=163840,
    )
    mx.random.seed(seed)
    attn = deepseek_v3.DeepseekV3Attention(args)
    attn.set_dtype(dtype)
    return attn


def test_the_yarn_cases_are_what_they_say():
    from mlx_lm.models.rope_utils import YarnRoPE

    ds = _yarn_attention("deepseek_v3", 2, 16, mx.float32, 0).rope
    other = _yarn_attention("mscale", 2, 16, mx.float32, 0).rope
    assert type(ds) is type(other) is YarnRoPE and ds.traditional and other.traditional
    assert ds.mscale == 1.0 and other.mscale > 1.0
    for dtype in (mx.bfloat16, mx.float16):  # the input multiply rounds: a real test of its place
        assert mx.array(other.mscale, dtype=dtype).item() != other.mscale


@pytest.mark.parametrize("name", sorted(YARN))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos", YARN_POSITIONS)
def test_yarn_reference_is_mlx_lm_attention_rope(monkeypatch, name, dtype, pos):
    """mlx-lm's DeepseekV3Attention at decode with rope_scaling yarn: its YarnRoPE of q_pe
    and k_pe, and the `(q_pe * self.scale) @ k_pe^T` it hands to attention (self.scale with
    YaRN's mscale_all_dim factor), from the reference with `rope_args`' arguments, bitwise."""
    from mlx_lm.models import deepseek_v3

    from zmlx.patch.attention import rope_args

    attn = _yarn_attention(name, 3, 16, dtype, seed=pos + 3)
    roped, masks = [], []
    rope = attn.rope
    attn.rope = lambda x, offset: roped.append(rope(x, offset)) or roped[-1]

    def sdpa(q, k, v, cache, scale, mask):
        masks.append(mask)
        return mx.zeros((*q.shape[:-1], v.shape[-1]), q.dtype)

    monkeypatch.setattr(deepseek_v3, "scaled_dot_product_attention", sdpa)
    x = mx.random.normal((2, 1, 64), key=mx.random.key(pos)).astype(dtype)
    attn(x, cache=_Cache(pos))  # mlx-lm's __call__
    attn.rope = rope
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    kv = attn.kv_a_proj_with_mqa(x)
    args, kw = rope_args(attn, pos)
    assert kw["freqs"] is rope._freqs and kw["mscale"] == rope.mscale and kw["base"] is None
    q_pe, k_pe = reference(q, kv, *args, **kw)
    assert q_pe.dtype == k_pe.dtype == dtype
    assert mx.array_equal(k_pe, roped[1]).item()
    assert mx.array_equal(q_pe, roped[0] * attn.scale).item()
    assert mx.array_equal(q_pe @ k_pe.swapaxes(-1, -2), masks[0]).item()


def _table_rope(x, table, pos, mscale):
    """x (..., 64) roped with the table's row `pos` in float32 (the kernel's arithmetic, as
    MLX ops), after YarnRoPE's input multiply in x's dtype."""
    if mscale != 1.0:
        x = x * mscale
    x = x.astype(mx.float32)
    c, s = table[pos, 0::2], table[pos, 1::2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return mx.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(x.shape)


@pytest.mark.parametrize("name", sorted(YARN))
def test_yarn_table_rows_are_what_yarn_rope_rotates_with(name):
    """On the CPU (float32, whose rope is those ops): stock's YarnRoPE of a row at a
    position equals the rotation with the table row made from its frequencies."""
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        rope = _yarn_attention(name, 1, 16, mx.float32, 0).rope
        t = rope_table(64, None, 1.0, 100001, freqs=rope._freqs)
        x = mx.random.normal((1, 1, 1, 64), key=mx.random.key(3)) * 3
        for p in YARN_POSITIONS:
            assert mx.array_equal(_table_rope(x, t, p, rope.mscale), rope(x, p)).item(), p
    finally:
        mx.set_default_device(before)


def test_yarn_table_is_cached_by_the_frequencies_values():
    mod._TABLES.clear()
    a = _yarn_attention("deepseek_v3", 1, 16, mx.float32, 0).rope
    b = _yarn_attention("deepseek_v3", 1, 16, mx.float32, 1).rope  # another layer: its own array
    other = _yarn_attention("mscale", 1, 16, mx.float32, 0).rope
    assert a._freqs is not b._freqs
    ta = rope_table(64, None, 1.0, 5, freqs=a._freqs)
    assert rope_table(64, None, 1.0, 5, freqs=b._freqs) is ta  # every layer shares one table
    assert rope_table(64, None, 1.0, 5, freqs=other._freqs) is not ta
    assert not mx.array_equal(rope_table(64, None, 1.0, 5, freqs=other._freqs), ta).item()
    assert not mx.array_equal(rope_table(64, 10000.0, 1.0, 5), ta).item()  # plain RoPE, same base


def _yarn_kwargs(name, heads, nope):
    rope = _yarn_attention(name, 1, 16, mx.float32, 0).rope  # the rope does not depend on the heads
    kw = dict(heads=heads, rope_dims=64, base=None, rope_scale=1.0, scale=(nope + 64) ** -0.5)
    return dict(kw, freqs=rope._freqs, mscale=rope.mscale)


def _kernel_arithmetic(q, kv, table, pos, *, heads, scale, mscale, **_):
    """What the kernel computes, as MLX ops: the table rotation in float32 of the input
    multiplied by mscale in T, rounded to T, q_pe times T(scale) in T."""
    b = q.shape[0]
    q_pe = q.reshape(b, heads, -1)[..., -64:].reshape(b, heads, 1, 64)
    k_pe = kv[..., -64:].reshape(b, 1, 1, 64)
    q_pe = _table_rope(q_pe, table, pos, mscale).astype(q.dtype)
    k_pe = _table_rope(k_pe, table, pos, mscale).astype(q.dtype)
    return q_pe * scale, k_pe


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("name", sorted(YARN))
@pytest.mark.parametrize("b,heads,nope,rank", SHAPES[1:])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos", YARN_POSITIONS)
def test_metal_body_with_yarn(tmp_path_factory, name, b, heads, nope, rank, dtype, pos):
    """Through the emulation (outputs poisoned with NaN): bitwise the kernel's arithmetic in
    MLX ops (YarnRoPE's input multiply in T, the table's rotation in float32) in every
    dtype; and the reference (stock) bitwise in float32, within two roundings in bf16/f16
    (MLX's CPU rope rotates in those dtypes)."""
    kw = _yarn_kwargs(name, heads, nope)
    q, kv = _inputs(b, heads, nope, rank, dtype, pos + heads)
    t = rope_table(64, None, 1.0, pos + 1, freqs=kw["freqs"])
    got = metal_emu.run(glm47_rope, q, kv, t, pos, **kw, workdir=tmp_path_factory.getbasetemp())
    arith = _kernel_arithmetic(q, kv, t, pos, **kw)
    want = reference(q, kv, t, pos, **kw)
    for g, a, w in zip(got, arith, want):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape
        assert mx.array_equal(g, a).item()
        if dtype == mx.float32:
            assert mx.array_equal(g, w).item()
        else:
            tol = {mx.bfloat16: 2**-7, mx.float16: 2**-10}[dtype] * 6  # |values| <= ~8 * mscale
            assert mx.allclose(g.astype(mx.float32), w.astype(mx.float32), rtol=2 * tol, atol=tol).item()


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_metal_body_without_the_input_multiply_is_caught(tmp_path_factory):
    """The kernel-arithmetic comparison above sees the mscale multiply left out."""
    kw = _yarn_kwargs("mscale", 3, 16)
    q, kv = _inputs(1, 3, 16, 48, mx.bfloat16, 5)
    t = rope_table(64, None, 1.0, 18, freqs=kw["freqs"])
    got = metal_emu.run(
        glm47_rope, q, kv, t, 17, **dict(kw, mscale=1.0), workdir=tmp_path_factory.getbasetemp()
    )
    arith = _kernel_arithmetic(q, kv, t, 17, **kw)
    assert not any(mx.array_equal(g, a).item() for g, a in zip(got, arith))


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(YARN))
@pytest.mark.parametrize("b,heads,nope,rank", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos", YARN_POSITIONS + [131071])
def test_cuda_kernel_with_yarn_is_bitwise_stock(name, b, heads, nope, rank, dtype, pos):
    """The reference is stock's op sequence (YarnRoPE's multiply, mx.fast.rope with freqs,
    the scale multiply), run by MLX's CUDA kernels."""
    kw = _yarn_kwargs(name, heads, nope)
    q, kv = _inputs(b, heads, nope, rank, dtype, pos + 7 * heads)
    t = rope_table(64, None, 1.0, pos + 1, freqs=kw["freqs"])
    want = reference(q, kv, t, pos, **kw)
    got = glm47_rope.run_kernel("cuda", q, kv, t, pos, **kw, init_value=float("nan"))  # poisoned
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape
        assert mx.array_equal(g, w).item()


def test_which_ropes_the_mla_patterns_take():
    """glm47_rope, mla_attention (through its launch) and mla_block (mla_q_prep ropes as
    glm47_rope) take YaRN; every other rope class, and a YaRN rope on split halves, is
    refused with its reason."""
    import mlx.nn as nn
    from mlx_lm.models.rope_utils import Llama3RoPE, YarnRoPE

    from zmlx.patch.attention import mla_rope_reason

    attn = _yarn_attention("mscale", 2, 16, mx.float32, 0)
    assert mla_rope_reason(attn) is None
    attn.rope = YarnRoPE(64, traditional=False, scaling_factor=32.0)
    assert "not traditional" in mla_rope_reason(attn)
    attn.rope = Llama3RoPE(64, traditional=True, scaling_config={"factor": 8.0})
    assert "rope is Llama3RoPE, not nn.RoPE or YarnRoPE" in mla_rope_reason(attn)
    attn.rope = nn.RoPE(64, traditional=True, base=1e4)
    assert mla_rope_reason(attn) is None
