"""glm47_rope: MLA decode RoPE of q_pe and k_pe (+ q_pe's scale), bitwise mx.fast.rope on the GPU."""

import mlx.core as mx
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
