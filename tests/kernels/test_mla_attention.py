"""mla_attention's kernels (embed_q, flash-decoding chunks, combine + unembed): close to a
float32 reference; the chunked decomposition equals plain softmax attention."""

import math

import mlx.core as mx
import pytest

import zmlx
from zmlx.kernels import metal_emu
from zmlx.kernels.core import Launch
from zmlx.kernels.mla_attention import (
    CHUNK_STEP,
    MIN_CHUNK,
    TARGET_CHUNKS,
    UNEMBED_THREADS,
    chunk_size,
    decode_reference,
    embed_q_reference,
    mla_decode,
    mla_embed_q,
    mla_unembed,
    unembed_reference,
)
from zmlx.kernels.moe_mlp import quantized_experts
from zmlx.kernels.quant import dequantized

DTYPES = [mx.bfloat16, mx.float16, mx.float32]
PACKINGS = [dict(group_size=64, bits=4), dict(group_size=32, bits=8), dict(group_size=None, bits=None)]


def _problem(b, heads, nope, rd, r, v, length, dtype, packing, seed, spare=5):
    """Inputs of one decode step: q projection output, the cache's buffers (length
    positions of data in a longer allocation), q_pe, and both per-head weight stacks."""
    ks = mx.random.split(mx.random.key(seed), 6)
    head_dim = nope + rd
    q = (mx.random.normal((b, 1, heads * head_dim), key=ks[0]) * 2).astype(dtype)
    q_pe = mx.random.normal((b, heads, 1, rd), key=ks[1]).astype(dtype) * 0.3
    lat = mx.random.normal((b, 1, length + spare, r), key=ks[2]).astype(dtype)
    kpe = mx.random.normal((b, 1, length + spare, rd), key=ks[3]).astype(dtype)
    lat, kpe = lat[:, :, :length], kpe[:, :, :length]  # views, as mlx-lm's update_and_fetch returns
    embed = quantized_experts(heads, r, nope, dtype=dtype, seed=seed + 10, **packing)
    unembed = quantized_experts(heads, v, r, dtype=dtype, seed=seed + 11, **packing)
    return q, q_pe, lat, kpe, embed, unembed, head_dim**-0.5


def _attention_f32(q, q_pe, lat, kpe, embed, unembed, scale, *, heads, nope, length, dtype, packing):
    """Plain float32 MLA decode attention (one softmax over every position)."""
    b = q.shape[0]
    we = dequantized(*embed, **packing)
    wu = dequantized(*unembed, **packing)
    qn = q.reshape(b, heads, -1)[..., :nope].astype(mx.float32)
    qv = _dot(we[None], qn[:, :, None, :])  # (B, H, R)
    lt = lat[:, 0, :length].astype(mx.float32)
    kp = kpe[:, 0, :length].astype(mx.float32)
    qp = q_pe[:, :, 0, None].astype(mx.float32)
    s = scale * _dot(qv[:, :, None, :], lt[:, None]) + _dot(qp, kp[:, None])
    p = mx.softmax(s, axis=-1, precise=True)  # (B, H, S)
    x = _dot(p[..., None, :], lt[:, None].swapaxes(-1, -2))  # (B, H, R)
    return _dot(wu[None], x[:, :, None, :])[:, :, None, :].astype(dtype)


def _dot(a, b):  # float32 products without matmul (CUDA runs float32 matmuls as TF32)
    return (a * b).sum(axis=-1)


def _chain(fns, q, q_pe, lat, kpe, embed, unembed, scale, *, heads, nope, length, dtype, packing):
    embed_fn, decode_fn, unembed_fn = fns
    head_dim = q.shape[-1] // heads
    qv = embed_fn(q, *embed, heads=heads, head_dim=head_dim, nope=nope, **packing)
    o, m, lsum = decode_fn(qv, q_pe, lat, kpe, scale=scale)
    return unembed_fn(o, m, lsum, *unembed, dtype=dtype, **packing)


def test_chunks_are_bounded_in_count_and_size():
    for length in (1, 31, 32, 33, 200, 2047, 2048, 2049, 4096, 32768, 131072):
        ch = chunk_size(length)
        assert ch >= MIN_CHUNK and ch % CHUNK_STEP == 0
        assert math.ceil(length / ch) <= TARGET_CHUNKS
        assert ch == MIN_CHUNK or math.ceil(length / (ch - CHUNK_STEP)) > TARGET_CHUNKS  # none larger


@pytest.mark.parametrize("length", [1, 17, MIN_CHUNK, MIN_CHUNK + 1, 300, 5000])
@pytest.mark.parametrize("packing", PACKINGS[:2])
def test_chunked_references_equal_plain_attention(length, packing):
    """The flash-decoding split (chunks, max, exp sums, combine) is plain softmax attention."""
    kw = dict(heads=3, nope=64, length=length, dtype=mx.float32, packing=packing)
    p = _problem(2, 3, 64, 32, 64, 48, length, mx.float32, packing, seed=length)
    got = _chain((embed_q_reference, decode_reference, unembed_reference), *p, **kw)
    want = _attention_f32(*p, **kw)
    assert got.shape == want.shape == (2, 3, 1, 48)
    assert mx.allclose(got, want, rtol=1e-4, atol=1e-5).item()


def test_launches_say_why_they_take_the_reference():
    packing = PACKINGS[0]
    q, q_pe, lat, kpe, embed, unembed, scale = _problem(1, 3, 64, 64, 128, 48, 10, mx.bfloat16, packing, 1)
    head = dict(heads=3, head_dim=128, nope=64, **packing)
    assert isinstance(mla_embed_q.launch("cuda", q, *embed, **head), Launch)
    assert "one token" in mla_embed_q.launch("cuda", mx.concatenate([q, q], axis=1), *embed, **head).reason
    assert "embed_q" in mla_embed_q.launch("cuda", q, *embed, **{**head, "nope": 80}).reason
    qv = embed_q_reference(q, *embed, **head)
    assert isinstance(mla_decode.launch("cuda", qv, q_pe, lat, kpe, scale=scale), Launch)
    assert "cache buffers" in mla_decode.launch("cuda", qv, q_pe, lat, kpe[:, :, :5], scale=scale).reason
    assert "float32" in mla_decode.launch("cuda", qv.astype(mx.bfloat16), q_pe, lat, kpe, scale=scale).reason
    kpe32 = kpe.astype(mx.float32)
    assert "one float dtype" in mla_decode.launch("cuda", qv, q_pe, lat, kpe32, scale=scale).reason
    narrow = mla_decode.launch("cuda", qv[..., :64], q_pe, lat[..., :64], kpe, scale=scale)
    assert "multiples of 128" in narrow.reason  # the latent's vector loads
    o, m, lsum = decode_reference(qv, q_pe, lat, kpe, scale=scale)
    out = dict(dtype=mx.bfloat16, **packing)
    assert isinstance(mla_unembed.launch("cuda", o, m, lsum, *unembed, **out), Launch)
    assert "partials" in mla_unembed.launch("cuda", o, m[:, :, :2], lsum, *unembed, **out).reason


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("length", [1, 70])
def test_metal_bodies_match_their_references(tmp_path_factory, dtype, packing, length):
    """Each kernel through the emulation (outputs poisoned with NaN) against its reference,
    within the kernel's stated tolerance."""
    work = tmp_path_factory.getbasetemp()
    q, q_pe, lat, kpe, embed, unembed, scale = _problem(1, 3, 64, 64, 128, 40, length, dtype, packing, length)
    head = dict(heads=3, head_dim=128, nope=64, **packing)  # 3 heads: a warp with a spare head
    cases = [(mla_embed_q, (q, *embed), head)]
    qv = embed_q_reference(q, *embed, **head)
    cases.append((mla_decode, (qv, q_pe, lat, kpe), dict(scale=scale)))
    o, m, lsum = decode_reference(qv, q_pe, lat, kpe, scale=scale)
    cases.append((mla_unembed, (o, m, lsum, *unembed), dict(dtype=dtype, **packing)))
    for kernel, args, kw in cases:
        got = metal_emu.run(kernel, *args, **kw, workdir=work)
        want = kernel.reference(*args, **kw)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape, kernel.name
            tol = kernel.tolerance if kernel is not mla_unembed else {mx.float32: 1e-4}.get(dtype, 2e-2)
            close = mx.allclose(g.astype(mx.float32), w.astype(mx.float32), rtol=tol, atol=tol)
            assert close.item(), kernel.name


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_decode_body_chunks_as_chunk_size_does(tmp_path_factory, monkeypatch):
    """The body computes its chunk size from the length it reads off the cache's shape; with
    few target chunks it must grow past MIN_CHUNK exactly as chunk_size does (150 positions
    into 4 chunks of 48, the last partial), or the partials land in the wrong places."""
    from zmlx.kernels import mla_attention as mla

    monkeypatch.setattr(mla, "TARGET_CHUNKS", 4)
    assert chunk_size(150) == 48
    packing = PACKINGS[0]
    q, q_pe, lat, kpe, embed, _, scale = _problem(1, 3, 64, 64, 128, 40, 150, mx.bfloat16, packing, 150)
    qv = embed_q_reference(q, *embed, heads=3, head_dim=128, nope=64, **packing)
    got = metal_emu.run(mla_decode, qv, q_pe, lat, kpe, scale=scale, workdir=tmp_path_factory.getbasetemp())
    want = decode_reference(qv, q_pe, lat, kpe, scale=scale)
    assert got[0].shape == want[0].shape == (1, 4, 3, 128)
    for g, w in zip(got, want):
        assert mx.allclose(g, w, rtol=mla_decode.tolerance, atol=mla_decode.tolerance).item()


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_unembed_combines_many_chunks(tmp_path_factory):
    """mla_unembed combines any number of chunks (more than mla_decode makes, and more than
    a threadgroup has threads), each thread over every CL-th chunk with its own running max."""
    ks = mx.random.split(mx.random.key(9), 3)
    c = UNEMBED_THREADS + 90
    o = mx.random.normal((1, c, 2, 64), key=ks[0])
    m = mx.random.normal((1, c, 2), key=ks[1]) * 4
    lsum = 1 + mx.random.uniform(shape=(1, c, 2), key=ks[2]) * 60
    w, s, b = quantized_experts(2, 40, 64, dtype=mx.float32, seed=4, group_size=64, bits=4)
    kw = dict(dtype=mx.float32, group_size=64, bits=4)
    got = metal_emu.run(mla_unembed, o, m, lsum, w, s, b, **kw, workdir=tmp_path_factory.getbasetemp())
    want = unembed_reference(o, m, lsum, w, s, b, **kw)
    assert mx.allclose(got, want, rtol=1e-4, atol=1e-5).item()


def test_patched_model_decodes_close_to_stock(tiny_q4, decode_steps):
    """On the CPU the pattern runs its float32 references: the prompt is stock's own path
    (bitwise), decode steps stay close to stock's logits and pick the same tokens here."""
    model, _ = tiny_q4
    prompt = mx.array([[3, 14, 15, 92, 65, 35, 89]])
    stock = decode_steps(model, prompt, 6)
    result = zmlx.patch(model, patterns=["mla_attention"])
    try:
        assert len(result.patterns["mla_attention"].patched) == model.args.num_hidden_layers
        assert result.patterns["mla_attention"].fidelity == "close"
        patched = decode_steps(model, prompt, 6)
    finally:
        zmlx.unpatch(model)
    assert mx.array_equal(stock[0], patched[0]).item()
    for s, p in zip(stock[1:], patched[1:]):
        assert mx.argmax(s[0, -1]).item() == mx.argmax(p[0, -1]).item()
        assert mx.abs(s - p).max().item() < 0.1 * mx.abs(s).max().item()


def test_mla_attention_wins_over_glm47_rope_and_says_so(tiny_q4):
    model, _ = tiny_q4
    result = zmlx.patch(model, patterns=["mla_attention", "glm47_rope"])
    try:
        assert len(result.patterns["mla_attention"].patched) == model.args.num_hidden_layers
        assert not result.patterns["glm47_rope"].patched
        assert "already replaced by mla_attention" in result.patterns["glm47_rope"].skipped[0][1]
    finally:
        zmlx.unpatch(model)


GLM_SHAPE = dict(heads=20, nope=192, rd=64, r=512, v=256)


@pytest.mark.cuda
@pytest.mark.parametrize("length", [1, 17, 4096, 32768])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("packing", PACKINGS)
def test_cuda_kernels_match_their_references(length, dtype, packing):
    """GLM-4.7-Flash's attention shape at the issue's context lengths, each kernel on the
    reference's own inputs, outputs poisoned."""
    g = GLM_SHAPE
    batch = 2 if length == 17 else 1  # two sequences: the cache views are strided (MLX copies them)
    q, q_pe, lat, kpe, embed, unembed, scale = _problem(
        batch, g["heads"], g["nope"], g["rd"], g["r"], g["v"], length, dtype, packing, seed=length % 1000
    )
    head = dict(heads=g["heads"], head_dim=g["nope"] + g["rd"], nope=g["nope"], **packing)
    qv = embed_q_reference(q, *embed, **head)
    o, m, lsum = decode_reference(qv, q_pe, lat, kpe, scale=scale)
    checks = [
        (mla_embed_q, (q, *embed), head, qv),
        (mla_decode, (qv, q_pe, lat, kpe), dict(scale=scale), (o, m, lsum)),
        (
            mla_unembed,
            (o, m, lsum, *unembed),
            dict(dtype=dtype, **packing),
            unembed_reference(o, m, lsum, *unembed, dtype=dtype, **packing),
        ),
    ]
    for kernel, args, kw, want in checks:
        got = kernel.run_kernel("cuda", *args, **kw, init_value=float("nan"))
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        tol = kernel.tolerance if dtype == mx.bfloat16 or kernel is not mla_unembed else 1e-4
        for gt, w in zip(got, want):
            assert gt.dtype == w.dtype and gt.shape == w.shape
            close = mx.allclose(gt.astype(mx.float32), w.astype(mx.float32), rtol=tol, atol=tol)
            assert close.item(), kernel.name


@pytest.mark.cuda
@pytest.mark.parametrize("length", [17, 4096])
def test_cuda_attention_is_nearer_float32_than_stock(length):
    """The whole decode attention: our error against float32 is at most stock's (which
    rounds to bf16 at every step), plus a rounding."""
    g = GLM_SHAPE
    packing = PACKINGS[0]
    kw = dict(heads=g["heads"], nope=g["nope"], length=length, dtype=mx.bfloat16, packing=packing)
    q, q_pe, lat, kpe, embed, unembed, scale = p = _problem(
        1, g["heads"], g["nope"], g["rd"], g["r"], g["v"], length, mx.bfloat16, packing, seed=3
    )
    ours = _chain((mla_embed_q, mla_decode, mla_unembed), *p, **kw)
    want = _attention_f32(*p, **kw).astype(mx.float32)
    # stock: mlx-lm's ops on the same inputs (its q_pe already scaled and roped)
    qh = q.reshape(1, 1, g["heads"], -1).transpose(0, 2, 1, 3)
    q_nope = qh[..., : g["nope"]]
    k = lat[:, :, :length]
    pe_scores = q_pe @ kpe[:, :, :length].swapaxes(-1, -2)
    q_abs = mx.quantized_matmul(q_nope, *embed, transpose=True, **packing)
    out = mx.fast.scaled_dot_product_attention(q_abs, k, k, scale=scale, mask=pe_scores)
    stock = mx.quantized_matmul(out, *unembed, transpose=True, **packing)
    err_ours = mx.abs(ours.astype(mx.float32) - want).max().item()
    err_stock = mx.abs(stock.astype(mx.float32) - want).max().item()
    assert err_ours <= err_stock + 2**-7 * mx.abs(want).max().item(), (err_ours, err_stock)
    assert math.isfinite(err_ours)


@pytest.mark.cuda
def test_cuda_kernels_are_what_run():
    for k in (mla_embed_q, mla_decode, mla_unembed):
        assert k.plan("cuda").path == "kernel", k.plan("cuda").reason
