"""mla_q_prep: q_a_layernorm + q_b_proj + rope of q_pe (scaled) + embed_q, and kv_a_layernorm +
rope of k_pe, in one launch.

CPU: the reference equals the pieces mlx-lm's own `Glm4MoeLiteAttention` computes (its
embed_q output, its rope's q_pe times its scale, what it writes into the cache), random
weights, quantized by `nn.quantize` or not; and `DeepseekV3Attention`'s with YaRN's rope
(test_glm47_rope's cases: DeepSeek-V3's, and one whose rope scales its input, Kimi-K2's).
The Metal body through the emulation: each output as close to a float32 truth as stock is.
`cuda` tests: q_pe, kv_latent and k_pe bitwise stock, qv as close to float32 as stock's
embed_q, outputs poisoned first. Its variant mla_q_prep_nope (no embed_q, q_nope out): the
reference is mlx-lm's q_nope (embed_q's input) and the rest; the emulated Metal body as close
as stock and its q_pe, kv_latent, k_pe those of mla_q_prep's body; on CUDA all four bitwise."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import deepseek_v3, glm4_moe_lite
from mlx_lm.models.cache import KVCache
from test_glm47_rope import YARN  # the test directory is on sys.path (pytest)

from zmlx.kernels import metal_emu
from zmlx.kernels.core import Launch, Skip
from zmlx.kernels.glm47_rope import rope_table
from zmlx.kernels.mla_q_prep import (
    THREADS,
    inputs,
    kwargs,
    launch,
    launch_nope,
    mla_q_prep,
    mla_q_prep_nope,
    reference,
    reference_nope,
)
from zmlx.kernels.quant import dequantized, weights_of
from zmlx.patch.attention import rope_args

DTYPES = [mx.bfloat16, mx.float16, mx.float32]
Q4, Q8 = dict(group_size=32, bits=4), dict(group_size=64, bits=8)
SHAPES = [  # (batch, heads, q_lora_rank, nope, rope_dims, kv_lora_rank)
    # small and odd; nope 64 and latent 128, not 32 and 64: stock's embed_q product has no
    # CUDA kernel for nope 32 (mlx 0.32.4 on the H200); the emulation also takes nope 32 below
    (1, 3, 96, 64, 16, 128),
    (1, 20, 768, 192, 64, 512),  # GLM-4.7-Flash
    (1, 5, 320, 64, 32, 128),  # q_lora_rank: 2 values per lane in the unquantized gemv
    (1, 1, 200, 16, 8, 40),  # 1 value per lane, one head
]
PACKINGS = [(Q4, Q4), (Q8, None), (None, Q4), (None, None)]  # (q_b_proj, embed_q)


def _packing_for(p, cols):
    """p, or groups of 32 where the width has no whole group of p's size (unquantized where
    it has none of 32 either)."""
    if p is None or cols % p["group_size"] == 0:
        return p
    return dict(p, group_size=32) if cols % 32 == 0 else None


def _problem(shape, dtype, packings, seed, position=37, yarn=None):
    """Random inputs of `shape`; yarn (a name in YARN): the rope and scale of mlx-lm's
    DeepseekV3Attention with that rope_scaling (its YarnRoPE's table, freqs and mscale)."""
    b, heads, qlr, nope, rd, rank = shape
    qp, ep = _packing_for(packings[0], qlr), _packing_for(packings[1], nope)
    args = inputs(b, heads, qlr, nope, rd, rank, dtype, seed, packing=qp, embed_packing=ep)
    kw = kwargs(heads, nope, rd, packing=qp, embed_packing=ep, base=1_000_000.0)
    if yarn is None:
        return (*args, rope_table(rd, kw["base"], 1.0, position + 1), position), kw
    (table, _), rope_kw = rope_args(_attention(1, 32, nope, rd, 32, mx.float32, None, 0, yarn), position)
    kw.update((k, rope_kw[k]) for k in ("base", "rope_scale", "freqs", "mscale", "scale"))
    return (*args, table, position), kw


# ---------------------------------------------------------------- the reference is mlx-lm's


def _attention(heads, qlr, nope, rd, rank, dtype, bits, seed, yarn=None):
    """mlx-lm's Glm4MoeLiteAttention, or (yarn: a name in YARN) its DeepseekV3Attention with
    that rope_scaling, at a tiny size with random norm weights."""
    kw = dict(
        hidden_size=64,
        num_attention_heads=heads,
        q_lora_rank=qlr,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rd,
        kv_lora_rank=rank,
        v_head_dim=32,
    )
    mx.random.seed(seed)
    if yarn is None:
        attn = glm4_moe_lite.Glm4MoeLiteAttention(glm4_moe_lite.ModelArgs(**kw))
    else:
        scaling, theta = YARN[yarn]
        yarn_kw = dict(rope_theta=theta, rope_scaling=scaling, max_position_embeddings=163840)
        args = deepseek_v3.ModelArgs(model_type="deepseek_v3", num_key_value_heads=heads, **kw, **yarn_kw)
        attn = deepseek_v3.DeepseekV3Attention(args)
    attn.q_a_layernorm.weight = 1 + 0.1 * mx.random.normal((qlr,))
    attn.kv_a_layernorm.weight = 1 + 0.1 * mx.random.normal((rank,))
    attn.set_dtype(dtype)
    if bits is not None:
        nn.quantize(attn, group_size=32, bits=bits)
    return attn


class _Recorder(nn.Module):
    """A module that runs `inner` and keeps its first inputs and its outputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.inputs: list = []
        self.outputs: list = []

    def __call__(self, *args, **kw):
        out = self.inner(*args, **kw)
        self.inputs.append(args[0])
        self.outputs.append(out)
        return out


def _stock_pieces(attn, x, offset):
    """What mlx-lm's module computes for one decode token at `offset`: (embed_q's output,
    its roped q_pe times its scale, the kv_latent and k_pe it writes into the cache)."""
    b = x.shape[0]
    cache = KVCache()
    if offset:
        lat, kpe = (mx.zeros((b, 1, offset, d), x.dtype) for d in (attn.kv_lora_rank, attn.qk_rope_head_dim))
        cache.update_and_fetch(lat, kpe)
    attn.embed_q = _Recorder(attn.embed_q)
    attn.rope = _Recorder(attn.rope)
    attn(x, mask=None, cache=cache)
    q_pe = attn.rope.outputs[0]
    pos = slice(offset, offset + 1)
    return attn.embed_q.outputs[0], q_pe * attn.scale, cache.keys[:, :, pos], cache.values[:, :, pos]


def _stock_nope_pieces(attn, x, offset):
    """_stock_pieces with embed_q's input, q_nope, in place of its output."""
    _, *rest = _stock_pieces(attn, x, offset)
    return (attn.embed_q.inputs[0], *rest)


def _nope(args, kw):
    """mla_q_prep's arguments less embed_q's: mla_q_prep_nope's."""
    return (*args[:7], *args[10:]), {k: v for k, v in kw.items() if not k.startswith("embed_")}


def _ours_args(attn, x, offset):
    """mla_q_prep's arguments for the same token, from the module's own projections and weights."""
    (qb, qb_packing), (eq, eq_packing) = weights_of(attn.q_b_proj), weights_of(attn.embed_q)
    (table, pos), kw = rope_args(attn, offset)
    kw = dict(kw, eps=attn.q_a_layernorm.eps, **qb_packing)
    kw.update(embed_group_size=eq_packing["group_size"], embed_bits=eq_packing["bits"])
    q_a, ckv = attn.q_a_proj(x), attn.kv_a_proj_with_mqa(x)
    qa_w, kv_w = attn.q_a_layernorm.weight, attn.kv_a_layernorm.weight
    return (q_a, ckv, qa_w, *qb, kv_w, *eq, table, pos), kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8, None])
@pytest.mark.parametrize("b,offset", [(1, 37), (2, 0)])
@pytest.mark.parametrize("yarn", [None, *sorted(YARN)])
def test_reference_is_mlx_lm_attention(dtype, bits, b, offset, yarn):
    attn = _attention(3, 96, 32, 16, 64, dtype, bits, seed=b + offset, yarn=yarn)
    x = mx.random.normal((b, 1, 64), key=mx.random.key(5)).astype(dtype)
    args, kw = _ours_args(attn, x, offset)
    if yarn is not None:  # YarnRoPE's own frequencies and input scale
        assert kw["freqs"] is attn.rope._freqs and kw["mscale"] == attn.rope.mscale
    qv, q_pe, kv_latent, k_pe = reference(*args, **kw)
    want_qv, want_pe, want_lat, want_kpe = _stock_pieces(attn, x, offset)
    assert qv.dtype == mx.float32 and qv.shape == (b, 3, 64)
    assert mx.array_equal(qv, want_qv.reshape(b, 3, 64).astype(mx.float32)).item()
    for got, want in ((q_pe, want_pe), (kv_latent, want_lat), (k_pe, want_kpe)):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert mx.array_equal(got, want).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8, None])
@pytest.mark.parametrize("heads,b,offset", [(3, 1, 37), (5, 2, 0), (1, 1, 5)])
@pytest.mark.parametrize("yarn", [None, *sorted(YARN)])
def test_nope_reference_is_mlx_lm_attention(dtype, bits, heads, b, offset, yarn):
    """q_nope bitwise what mlx-lm's module hands embed_q, and q_pe * scale, kv_latent, k_pe."""
    attn = _attention(heads, 96, 32, 16, 64, dtype, bits, seed=b + offset + heads, yarn=yarn)
    x = mx.random.normal((b, 1, 64), key=mx.random.key(5)).astype(dtype)
    args, kw = _nope(*_ours_args(attn, x, offset))
    got = reference_nope(*args, **kw)
    want = _stock_nope_pieces(attn, x, offset)
    assert got[0].shape == (b, heads, 1, 32)
    for name, g, w in zip(("q_nope", "q_pe", "kv_latent", "k_pe"), got, want):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape, name
        assert mx.array_equal(g, w).item(), name


def test_the_nope_comparison_sees_a_wrong_head():
    """q_nope with two heads swapped is not what mlx-lm hands embed_q."""
    attn = _attention(3, 96, 32, 16, 64, mx.bfloat16, 4, seed=3)
    x = mx.random.normal((1, 1, 64), key=mx.random.key(5)).astype(mx.bfloat16)
    q_nope = reference_nope(*_nope(*_ours_args(attn, x, 7))[0], **_nope(*_ours_args(attn, x, 7))[1])[0]
    want = _stock_nope_pieces(attn, x, 7)[0]
    assert not mx.array_equal(q_nope[:, ::-1], want).item()


def test_reference_takes_q_proj_output_without_q_lora_rank():
    args, kw = _problem(SHAPES[0], mx.bfloat16, (Q4, Q4), 3)
    q_a, ckv, _, qb_w, qb_s, qb_b, *rest = args
    q = mx.quantized_matmul(mx.fast.rms_norm(q_a, args[2], 1e-5), qb_w, qb_s, qb_b, group_size=32, bits=4)
    got = reference(q, ckv, None, None, None, None, *rest, **kw)
    assert all(mx.array_equal(a, b).item() for a, b in zip(got, reference(*args, **kw)))


# ---------------------------------------------------------------- launch


def test_launch_says_why_it_takes_the_reference():
    args, kw = _problem(SHAPES[1], mx.bfloat16, (Q4, Q4), 1)
    q_a, ckv, qa_w, qb_w, qb_s, qb_b, kv_w, eq_w, eq_s, eq_b, table, pos = args
    spec = launch("cuda", *args, **kw)
    assert isinstance(spec, Launch)
    # 4 threadgroups a head (embed_q's rows in slices), + kv
    assert spec.grid == ((20 * 4 + 1) * THREADS, 1, 1) and spec.threadgroup == (THREADS, 1, 1)
    assert [tuple(s) for s in spec.output_shapes] == [
        (1, 20, 512),
        (1, 20, 1, 64),
        (1, 1, 1, 512),
        (1, 1, 1, 64),
    ]
    assert spec.output_dtypes == [mx.float32] + [mx.bfloat16] * 3

    def why(*a, backend="cuda", **k):
        got = launch(backend, *a, **{**kw, **k})
        assert isinstance(got, Skip), got
        return got.reason

    assert "q_lora_rank None" in why(q_a, ckv, None, None, None, None, *args[6:])
    assert "one float dtype" in why(q_a, ckv.astype(mx.float16), *args[2:])
    assert "norm weights" in why(q_a, ckv, qa_w.astype(mx.float32), *args[3:])
    assert "decode" in why(mx.concatenate([q_a, q_a], axis=1), ckv, *args[2:])
    two = [mx.concatenate([a, a]) for a in (q_a, ckv)]
    assert "2 rows" in why(*two, *args[2:])  # more than one token: stock leaves qmv on CUDA
    assert isinstance(launch("metal", *two, *args[2:], **kw), Launch)  # Metal is close anyway
    assert "scales" in why(q_a, ckv, qa_w, qb_w, qb_s.astype(mx.float32), qb_b, *args[6:])
    assert "q_b_proj weights" in why(q_a, ckv, qa_w, qb_w[:-1], qb_s[:-1], qb_b[:-1], *args[6:])
    assert "embed_q weights" in why(*args[:7], eq_w[:3], eq_s[:3], eq_b[:3], table, pos)
    assert "embed_q:" in why(*args[:7], eq_w, eq_s, None, table, pos)
    assert "does not cover position" in why(*args[:10], table, table.shape[0])
    assert "one int position" in why(*args[:10], table, mx.array(3))
    assert "rope_dims" in why(*args, rope_dims=63)
    wide, wide_kw = _problem((1, 2, 4160, 32, 16, 64), mx.bfloat16, (Q4, Q4), 2)
    assert "at most 4096" in why(*wide, **wide_kw)
    long_kv, long_kw = _problem((1, 2, 96, 32, 16, 4608), mx.bfloat16, (Q4, Q4), 2)
    assert "4096" in why(*long_kv, backend="metal", **long_kw)  # MLX's Metal rms_norm loops past 4096


def test_nope_launch_takes_no_embed_q():
    """mla_q_prep_nope's launch: no embed_q inputs or template, q_nope (B, H, 1, nope) in T
    out, a head's 256 rows over 8 threadgroups of 32 rows on CUDA (4 of 64 on Metal) where
    mla_q_prep takes 4 (embed_q's rows in slices); the embed_q reasons are not its."""
    args, kw = _problem(SHAPES[1], mx.bfloat16, (Q4, Q4), 1)
    nope_args, nope_kw = _nope(args, kw)
    spec, full = launch_nope("cuda", *nope_args, **nope_kw), launch("cuda", *args, **kw)
    assert isinstance(spec, Launch) and isinstance(full, Launch)
    assert spec.threadgroup == full.threadgroup == (512, 1, 1)
    assert (full.grid, spec.grid) == (((20 * 4 + 1) * 512, 1, 1), ((20 * 8 + 1) * 512, 1, 1))
    assert (dict(full.template)["QS"], dict(spec.template)["QS"], dict(spec.template)["QL"]) == (1, 8, 32)
    metal = launch_nope("metal", *nope_args, **nope_kw)
    assert (dict(metal.template)["QS"], dict(metal.template)["QL"]) == (4, 64)
    assert len(spec.inputs) == len(mla_q_prep_nope.input_names) == len(full.inputs) - 3
    assert {n for n, _ in full.template} - {n for n, _ in spec.template} == {"EGS", "EBITS"}
    # an odd nope would split a rope pair between slices: one threadgroup a head then
    odd, odd_kw = _problem((1, 3, 96, 17, 16, 128), mx.bfloat16, (Q4, None), 2)
    assert dict(launch_nope("cuda", *_nope(odd, odd_kw)[0], **_nope(odd, odd_kw)[1]).template)["QS"] == 1
    assert [tuple(s) for s in spec.output_shapes] == [(1, 20, 1, 192), *map(tuple, full.output_shapes[1:])]
    assert spec.output_dtypes == [mx.bfloat16] * 4
    # nope 18: not a whole number of 4 values for embed_q's dots (mla_q_prep skips); q_b_proj's
    # rows need no such thing
    odd, odd_kw = _problem((1, 3, 96, 18, 16, 128), mx.bfloat16, (Q4, None), 2)
    assert isinstance(launch("cuda", *odd, **odd_kw), Skip)
    assert isinstance(launch_nope("cuda", *_nope(odd, odd_kw)[0], **_nope(odd, odd_kw)[1]), Launch)
    got = launch_nope("cuda", *nope_args, **{**nope_kw, "rope_dims": 63})
    assert isinstance(got, Skip) and "rope_dims" in got.reason


# ---------------------------------------------------------------- Metal, through the emulation


def _truth(q_a, ckv, qa_w, qb_w, qb_s, qb_b, kv_w, eq_w, eq_s, eq_b, table, offset, **kw):
    """The four outputs in float32 from stock's inputs (no rounding to T on the way)."""
    f32 = mx.float32
    rd, heads, b = kw["rope_dims"], kw["heads"], q_a.shape[0]
    xn = mx.fast.rms_norm(q_a.astype(f32), qa_w.astype(f32), kw["eps"])
    q = (xn[..., None, :] * dequantized(qb_w, qb_s, qb_b, kw["group_size"], kw["bits"])).sum(axis=-1)
    q = q.reshape(b, heads, 1, -1)
    rope = dict(
        traditional=True, base=kw["base"], scale=kw["rope_scale"], offset=offset, freqs=kw.get("freqs")
    )
    m = kw.get("mscale", 1.0)  # YaRN's input scale
    q_pe = mx.fast.rope(q[..., -rd:] * m, rd, **rope) * kw["scale"]
    we = dequantized(eq_w, eq_s, eq_b, kw["embed_group_size"], kw["embed_bits"])  # (H, R, nope)
    qv = (we[None] * q[:, :, 0, None, :-rd]).sum(axis=-1)
    c = ckv.astype(f32)
    lat = mx.fast.rms_norm(c[..., :-rd], kv_w.astype(f32), kw["eps"])[:, None]
    k_pe = mx.fast.rope(c[:, None, :, -rd:] * m, rd, **rope)
    return qv, q_pe, lat, k_pe


EMU_SHAPES = [SHAPES[0], SHAPES[3], (2, 3, 96, 32, 16, 64), (1, 4, 256, 128, 64, 128)]


# every shape in every dtype, the packings taking turns (each compile of the emulation takes seconds);
# YaRN's rope in each dtype, its input scale in the two that round it
EMU_CASES = [
    (s, d, PACKINGS[(i + j) % 3], None) for i, s in enumerate(EMU_SHAPES) for j, d in enumerate(DTYPES)
] + [
    (EMU_SHAPES[0], mx.bfloat16, (Q4, Q4), "mscale"),
    (EMU_SHAPES[2], mx.float16, (None, Q4), "mscale"),
    (EMU_SHAPES[3], mx.float32, (Q8, None), "deepseek_v3"),
]


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("shape,dtype,packings,yarn", EMU_CASES)
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, shape, dtype, packings, yarn):
    args, kw = _problem(shape, dtype, packings, sum(shape), yarn=yarn)
    got = metal_emu.run(mla_q_prep, *args, workdir=tmp_path_factory.getbasetemp(), **kw)
    want = reference(*args, **kw)
    truth = _truth(*args, **kw)
    for name, g, w, t in zip(("qv", "q_pe", "kv_latent", "k_pe"), got, want, truth):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert not mx.any(mx.isnan(g.astype(mx.float32))).item(), name
        truth_f32, bar = close_bar(lambda *a, w=w, **k: w, lambda *a, t=t, **k: t, args, kw, dtype)
        assert mx.abs(g.astype(mx.float32) - truth_f32).max().item() <= bar, name


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_metal_self_check_example_passes(tmp_path_factory):
    args, kw = mla_q_prep.example()
    got = metal_emu.run(mla_q_prep, *args, workdir=tmp_path_factory.getbasetemp(), **kw)
    tol = mla_q_prep.tolerance
    assert all(mx.allclose(g, w, rtol=tol, atol=tol).item() for g, w in zip(got, reference(*args, **kw)))


# the last: a rope part across two of the nope body's slices of 64 rows (rows 48..79)
NOPE_EMU_CASES = [EMU_CASES[i] for i in (0, 4, 8, 13)] + [
    ((2, 3, 96, 48, 32, 64), mx.bfloat16, (Q4, None), None)
]


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("shape,dtype,packings,yarn", NOPE_EMU_CASES)
def test_metal_nope_body_is_as_close_as_stock_and_mla_q_preps(
    tmp_path_factory, close_bar, shape, dtype, packings, yarn
):
    """The ZMLX_QV 0 body: q_nope as close to the float32 truth as stock's q_b_proj, and q_pe,
    kv_latent, k_pe bitwise those of the same inputs through mla_q_prep's body."""
    args, kw = _problem(shape, dtype, packings, sum(shape), yarn=yarn)
    nope_args, nope_kw = _nope(args, kw)
    work = tmp_path_factory.getbasetemp()
    got = metal_emu.run(mla_q_prep_nope, *nope_args, workdir=work, **nope_kw)
    full = metal_emu.run(mla_q_prep, *args, workdir=work, **kw)
    want = reference_nope(*nope_args, **nope_kw)
    _, q_pe, lat, k_pe = _truth(*args, **kw)
    rd, heads, b = kw["rope_dims"], kw["heads"], shape[0]
    xn = mx.fast.rms_norm(args[0].astype(mx.float32), args[2].astype(mx.float32), kw["eps"])
    qb = dequantized(args[3], args[4], args[5], kw["group_size"], kw["bits"])
    q_nope = (xn[..., None, :] * qb).sum(axis=-1).reshape(b, heads, 1, -1)[..., :-rd]
    for name, g, w, t in zip(("q_nope", "q_pe", "kv_latent", "k_pe"), got, want, (q_nope, q_pe, lat, k_pe)):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        truth_f32, bar = close_bar(lambda *a, w=w, **k: w, lambda *a, t=t, **k: t, args, kw, dtype)
        assert mx.abs(g.astype(mx.float32) - truth_f32).max().item() <= bar, name
    for name, g, f in zip(("q_pe", "kv_latent", "k_pe"), got[1:], full[1:]):
        assert mx.array_equal(g, f).item(), name


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_metal_nope_self_check_example_passes(tmp_path_factory):
    args, kw = mla_q_prep_nope.example()
    got = metal_emu.run(mla_q_prep_nope, *args, workdir=tmp_path_factory.getbasetemp(), **kw)
    tol = mla_q_prep_nope.tolerance
    assert all(mx.allclose(g, w, rtol=tol, atol=tol).item() for g, w in zip(got, reference_nope(*args, **kw)))


# ---------------------------------------------------------------- CUDA (run on the GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packings", PACKINGS)
@pytest.mark.parametrize(
    "position,yarn", [(0, None), (4096, None), (4096, "deepseek_v3"), (100000, "mscale")]
)
def test_cuda_kernel_is_bitwise_stock_but_qv(close_bar, shape, dtype, packings, position, yarn):
    args, kw = _problem(shape, dtype, packings, sum(shape) + position, position, yarn)
    got = mla_q_prep.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    want = reference(*args, **kw)
    for name, g, w in zip(("qv", "q_pe", "kv_latent", "k_pe"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
    for name, g, w in zip(("q_pe", "kv_latent", "k_pe"), got[1:], want[1:]):
        assert mx.array_equal(g, w).item(), name
    truth = _truth(*args, **kw)[0]
    truth, bar = close_bar(lambda *a, **k: want[0], lambda *a, **k: truth, args, kw, dtype)
    assert mx.abs(got[0] - truth).max().item() <= bar


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packings", PACKINGS)
@pytest.mark.parametrize(
    "position,yarn", [(0, None), (4096, None), (4096, "deepseek_v3"), (100000, "mscale")]
)
def test_cuda_nope_kernel_is_bitwise_stock(shape, dtype, packings, position, yarn):
    """mla_q_prep_nope: all four outputs bitwise the reference (stock's ops), outputs poisoned."""
    args, kw = _nope(*_problem(shape, dtype, packings, sum(shape) + position, position, yarn))
    got = mla_q_prep_nope.run_kernel("cuda", *args, init_value=float("nan"), **kw)
    want = reference_nope(*args, **kw)
    for name, g, w in zip(("q_nope", "q_pe", "kv_latent", "k_pe"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert mx.array_equal(g, w).item(), name


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8, None])
@pytest.mark.parametrize("yarn", [None, *sorted(YARN)])
def test_cuda_nope_kernel_is_mlx_lm_attention(dtype, bits, yarn):
    attn = _attention(5, 96, 64, 16, 128, dtype, bits, seed=9, yarn=yarn)  # odd heads; nope 64: see SHAPES
    x = mx.random.normal((1, 1, 64), key=mx.random.key(6)).astype(dtype)
    args, kw = _nope(*_ours_args(attn, x, 300))
    got = mla_q_prep_nope.run_kernel("cuda", *args, init_value=float("nan"), **kw)
    want = _stock_nope_pieces(attn, x, 300)
    for name, g, w in zip(("q_nope", "q_pe", "kv_latent", "k_pe"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and mx.array_equal(g, w).item(), name


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8, None])
@pytest.mark.parametrize("yarn", [None, *sorted(YARN)])
def test_cuda_kernel_is_mlx_lm_attention_but_qv(dtype, bits, yarn):
    attn = _attention(3, 96, 64, 16, 128, dtype, bits, seed=9, yarn=yarn)  # nope 64: see SHAPES
    x = mx.random.normal((1, 1, 64), key=mx.random.key(6)).astype(dtype)
    args, kw = _ours_args(attn, x, 300)
    got = mla_q_prep.run_kernel("cuda", *args, init_value=float("nan"), **kw)
    want = _stock_pieces(attn, x, 300)
    for name, g, w in zip(("q_pe", "kv_latent", "k_pe"), got[1:], want[1:]):
        assert g.dtype == w.dtype and mx.array_equal(g, w).item(), name
    tol = mla_q_prep.tolerance
    assert mx.allclose(got[0], want[0].reshape(got[0].shape).astype(mx.float32), rtol=tol, atol=tol).item()


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", [mla_q_prep, mla_q_prep_nope], ids=lambda k: k.name)
def test_cuda_kernel_is_what_runs(kernel):
    assert kernel.plan("cuda").path == "kernel", kernel.plan("cuda").reason


# ------------------------------------------------- the slices change where rows run, not values


def _sliced(monkeypatch, slices: int, rows: int):
    """Set mla_q_prep's EMBED_SLICES and RQ (its launch reads them)."""
    from zmlx.kernels import mla_q_prep as mod

    monkeypatch.setattr(mod, "EMBED_SLICES", slices)
    monkeypatch.setattr(mod, "RQ", rows)


def test_launch_spreads_a_head_over_embed_slices(monkeypatch):
    args, kw = _problem(SHAPES[1], mx.bfloat16, (Q4, Q4), 5)  # GLM-4.7-Flash: 20 heads, latent 512
    spec = launch("cuda", *args, **kw)
    t = dict(spec.template)
    assert (t["ES"], t["RQ"], t["QS"], t["NB"]) == (4, 4, 1, 80)
    assert spec.grid[0] == (80 + 1) * spec.threadgroup[0]  # + the kv threadgroup
    _sliced(monkeypatch, 3, 1)  # 512 is not a multiple of 3: the largest divisor below
    t = dict(launch("cuda", *args, **kw).template)
    assert (t["ES"], t["RQ"]) == (2, 1)
    nope_args, nope_kw = _nope(args, kw)
    nt = dict(launch_nope("cuda", *nope_args, **nope_kw).template)
    assert nt["ES"] == 1 and nt["QS"] > 1  # the nope variant slices q_b's rows instead


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_metal_embed_slices_give_the_same_values(tmp_path_factory, monkeypatch):
    """Two sequences, an embed row count that the slices split unevenly across warps: every
    output bitwise the same with one slice a head and with four (each row's sums unchanged)."""
    args, kw = _problem((2, 3, 96, 32, 16, 40), mx.float32, (Q4, Q4), 11)
    work = tmp_path_factory.getbasetemp()
    got = {}
    for slices in (1, 4):
        _sliced(monkeypatch, slices, 4)
        got[slices] = metal_emu.run(mla_q_prep, *args, workdir=work, **kw)
    for name, a, b in zip(("qv", "q_pe", "kv_latent", "k_pe"), got[1], got[4]):
        assert mx.array_equal(a, b).item(), name


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [SHAPES[1], (1, 3, 96, 64, 16, 40), SHAPES[3]])  # qmv: one row
def test_cuda_slices_and_row_batches_give_the_same_values(monkeypatch, shape, dtype):
    """(EMBED_SLICES, RQ) = (1, 1), the old geometry, against (2, 2) and the defaults: every
    output bitwise the same, outputs poisoned; and mla_q_prep_nope's rows at once likewise."""
    from zmlx.kernels import mla_q_prep as mod

    args, kw = _problem(shape, dtype, (Q4, Q4), 23, 4096)
    nope_args, nope_kw = _nope(args, kw)
    runs = {}
    for cfg in ((1, 1), (2, 2), (mod.EMBED_SLICES, mod.RQ)):
        _sliced(monkeypatch, *cfg)
        full = mla_q_prep.run_kernel("cuda", *args, init_value=float("nan"), **kw)
        nope = mla_q_prep_nope.run_kernel("cuda", *nope_args, init_value=float("nan"), **nope_kw)
        mx.eval(full, nope)
        runs[cfg] = (*full, *nope)
    base = runs.pop((1, 1))
    for cfg, outs in runs.items():
        for i, (a, b) in enumerate(zip(base, outs)):
            assert mx.array_equal(a, b).item(), (cfg, i)
