"""mla_decode_q: decode attention over mlx-lm's quantized latent cache, dequantized in the kernel.

Its partials' reference, combined, is latent_attention (whose own agreement with mlx-lm is
tests/patch/test_mla_kv_quant.py's); the Metal body (emulated, outputs poisoned) matches the
partials' reference and, combined, is at least as close to a float32 truth as
latent_attention is (the close_bar rule); mla_kv_quant's decode step runs it and mla_unembed
where the kernels run; the `cuda` tests carry the same claims at the issue's lengths, through
both CUDA paths (bf16's tensor cores, the FMA path)."""

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import QuantizedKVCache

import zmlx
from zmlx.kernels import metal_emu
from zmlx.kernels import mla_decode_q as mla_decode_q_module
from zmlx.kernels.core import Launch
from zmlx.kernels.mla_attention import chunk_size
from zmlx.kernels.mla_decode_q import combine, inputs, mla_decode_q, reference
from zmlx.latent_quant import latent_attention

DTYPES = [mx.bfloat16, mx.float16, mx.float32]
PACKINGS = [(4, 64), (4, 32), (8, 64), (8, 32)]


def _latent_attention(q_nope, q_pe, lw, ls, lb, pw, ps, pb, *, scale, group_size, bits):
    """latent_attention (mx.dequantize, then mlx-lm's math) on the kernel's unpacked arguments."""
    quant = dict(group_size=group_size, bits=bits)
    return latent_attention(q_nope, q_pe, (lw, ls, lb), (pw, ps, pb), scale=scale, mask=None, **quant)


def _dot(a, b):  # float32 products without matmul (CUDA runs float32 matmuls as TF32)
    return (a * b).sum(axis=-1)


def _truth(q_nope, q_pe, lw, ls, lb, pw, ps, pb, *, scale, group_size, bits):
    """The attention in float32 over the cache dequantized in float32: one softmax over every
    position (no chunks), (B, H, 1, R)."""
    f32 = mx.float32
    quant = dict(group_size=group_size, bits=bits)
    lat = mx.dequantize(lw, ls.astype(f32), lb.astype(f32), **quant)[:, 0]  # (B, S, R)
    kpe = mx.dequantize(pw, ps.astype(f32), pb.astype(f32), **quant)[:, 0]
    qn, qp = q_nope[:, :, 0, None].astype(f32), q_pe[:, :, 0, None].astype(f32)
    s = scale * (_dot(qn, lat[:, None]) + _dot(qp, kpe[:, None]))  # (B, H, S)
    p = mx.softmax(s, axis=-1, precise=True)
    return _dot(p[..., None, :], lat[:, None].swapaxes(-1, -2))[:, :, None, :]


def _check(got, args, kw, dtype, close_bar):
    """Partials within the kernel's tolerance of the reference; combined, within close_bar of the
    float32 truth (2x latent_attention's error, plus a rounding of dtype)."""
    want = reference(*args, **kw)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == mx.float32 and g.shape == w.shape
        tol = mla_decode_q.tolerance
        assert mx.allclose(g, w, rtol=tol, atol=tol).item()
    truth, bar = close_bar(_latent_attention, _truth, args, kw, dtype)
    out = combine(*got, dtype)
    assert out.dtype == dtype and out.shape == truth.shape
    err = mx.abs(out.astype(mx.float32) - truth).max().item()
    assert err <= bar, (err, bar)


@pytest.mark.parametrize("length", [1, 17, 300])
@pytest.mark.parametrize("bits,group_size", PACKINGS)
def test_reference_combined_is_latent_attention(length, bits, group_size):
    """The chunked partials (float32 dequantization, chunk_size chunks, max and exp sums)
    combine to latent_attention over the same triples (float32 activations: no rounding
    between them but float32's)."""
    args, kw = inputs(2, 3, 128, 64, length, mx.float32, group_size=group_size, bits=bits, seed=length)
    o, m, lsum = reference(*args, **kw)
    assert o.shape == (2, -(-length // chunk_size(length)), 3, 128)
    got = combine(o, m, lsum, mx.float32)
    want = _latent_attention(*args, **kw)
    assert got.shape == want.shape == (2, 3, 1, 128)
    assert mx.allclose(got, want, rtol=1e-4, atol=1e-5).item()


def test_launch_says_why_it_takes_the_reference():
    args, kw = inputs(1, 3, 128, 64, 10, mx.bfloat16, group_size=64, bits=4)
    q_nope, q_pe, lw, ls, lb, pw, ps, pb = args
    assert isinstance(mla_decode_q.launch("cuda", *args, **kw), Launch)
    assert "4 or 8 bits" in mla_decode_q.launch("cuda", *args, **{**kw, "bits": 3}).reason
    assert "groups of 32 or 64" in mla_decode_q.launch("cuda", *args, **{**kw, "group_size": 128}).reason
    f16 = (q_nope, q_pe, lw, ls.astype(mx.float16), lb, pw, ps, pb)
    assert "one float dtype" in mla_decode_q.launch("cuda", *f16, **kw).reason
    two = (mx.concatenate([q_nope, q_nope], axis=2), q_pe, *args[2:])
    assert "one token" in mla_decode_q.launch("cuda", *two, **kw).reason
    short = (*args[:5], pw[:, :, :5], ps, pb)
    assert "cache pw" in mla_decode_q.launch("cuda", *short, **kw).reason
    as8 = mla_decode_q.launch("cuda", *args, **{**kw, "bits": 8})  # the words say 4 bits
    assert "cache lw" in as8.reason


# (heads, latent, rope, length, dtype, bits, group): every dtype, bit width and group, the
# lengths 1, 17 and 300 (a partial last chunk), odd head counts (a warp's spare head, a spare
# warp), a latent whose words leave lanes idle (128 at 4 bits: 16 words) and GLM's 512
EMU_CASES = [
    (3, 128, 64, 1, mx.bfloat16, 4, 64),
    (5, 256, 64, 17, mx.float16, 8, 32),
    (3, 128, 64, 300, mx.float32, 4, 32),
    (1, 128, 32, 17, mx.bfloat16, 8, 32),
    (7, 512, 64, 300, mx.bfloat16, 4, 64),
    (3, 128, 64, 300, mx.float16, 8, 64),
    (5, 256, 64, 1, mx.float32, 8, 64),
    (3, 256, 64, 17, mx.float32, 4, 32),
    (21, 128, 64, 17, mx.bfloat16, 8, 64),
]


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: "-".join(str(v).split(".")[-1] for v in c))
def test_metal_body_is_as_close_as_latent_attention(tmp_path_factory, close_bar, case):
    heads, r, rd, length, dtype, bits, group_size = case
    args, kw = inputs(1 if heads > 1 else 2, heads, r, rd, length, dtype, group_size=group_size, bits=bits)
    got = metal_emu.run(mla_decode_q, *args, **kw, workdir=tmp_path_factory.getbasetemp())  # poisoned NaN
    _check(got, args, kw, dtype, close_bar)


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_mla_kv_quant_decodes_through_the_kernels_where_they_run(tiny_q4):
    """The pattern's decode step with the Metal bodies emulated: mla_decode_q and mla_unembed
    launch (the wiring: q_nope, q_pe, the triples, the scale and unembed_out's weights reach
    them) and the output stays close to the reference path's (the CPU's)."""
    model = tiny_q4[0]
    attn = model.layers[0].self_attn
    zmlx.patch(model, patterns="mla_kv_quant")
    try:
        x = mx.random.normal((1, 9, model.args.hidden_size), key=mx.random.key(3)).astype(mx.bfloat16)
        outs = []
        for emulate in (False, True):
            cache = QuantizedKVCache(group_size=32, bits=8)
            attn(x[:, :8], None, cache)  # a prompt: mlx-lm's branch over the dequantized cache
            if emulate:
                with metal_emu.emulated() as emulation:
                    outs.append(attn(x[:, 8:], None, cache))
                    mx.eval(outs[-1])
                    assert mla_decode_q.plan().path == "kernel", mla_decode_q.plan().reason
                # the two self-checks and the step's two launches
                assert emulation.launches == 4
            else:
                outs.append(attn(x[:, 8:], None, cache))
    finally:
        zmlx.unpatch(model)
    ref, got = outs
    assert got.dtype == ref.dtype == mx.bfloat16 and got.shape == ref.shape
    # a few bf16 roundings apart (the reference path rounds after every op, through o_proj);
    # a wrong wiring (a scale, a swapped input, another head's weights) is off by tens of percent
    scale = mx.abs(ref.astype(mx.float32)).max().item()
    assert mx.abs(got.astype(mx.float32) - ref.astype(mx.float32)).max().item() <= 0.1 * scale


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_tensor_core_loader_gives_the_fragments_of_the_dequantized_rows(tmp_path):
    """The CUDA tensor-core path's dequantizing loader, compiled on the host (its bf16 types
    stubbed): every lane's fragments hold the dequantized values (rounded once to bf16) at the
    dims and rows mla_decode's tensor-core path reads, for both bit widths and group sizes."""
    here = Path(__file__).parent
    csrc = Path(mla_decode_q_module.__file__).parent / "csrc"
    exe = tmp_path / "loader"
    build = ["g++", "-std=c++17", "-O1", f"-I{csrc}", str(here / "mla_decode_q_loader.cpp"), "-o", str(exe)]
    subprocess.run(build, check=True, capture_output=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert run.stdout.count("bad 0") == 4


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_mla_kv_quant_runs_latent_attention_where_the_launch_skips(tiny_q4, monkeypatch):
    """Where the kernel runs but its launch refuses the shapes, the step is latent_attention's
    (the CPU's path, bitwise), not the kernel's float32 reference, whose (B, H, S, R) products
    would not fit at long contexts; mla_unembed does not run either."""
    model = tiny_q4[0]
    attn = model.layers[0].self_attn
    x = mx.random.normal((1, 6, model.args.hidden_size), key=mx.random.key(4)).astype(mx.bfloat16)
    zmlx.patch(model, patterns="mla_kv_quant")
    try:
        outs = []
        for emulate in (False, True):
            cache = QuantizedKVCache(group_size=64, bits=4)
            attn(x[:, :5], None, cache)
            if not emulate:
                outs.append(attn(x[:, 5:], None, cache))
                continue
            with metal_emu.emulated() as emulation:
                assert mla_decode_q.plan().path == "kernel"  # its self-check: one launch
                monkeypatch.setattr(mla_decode_q_module, "BITS", (8,))  # now it refuses 4 bits
                outs.append(attn(x[:, 5:], None, cache))
                mx.eval(outs[-1])
                assert emulation.launches == 1
    finally:
        zmlx.unpatch(model)
    assert mx.array_equal(outs[0], outs[1]).item()


GLM = dict(heads=20, r=512, rd=64)  # GLM-4.7-Flash's latent attention


@pytest.mark.cuda
@pytest.mark.parametrize("length", [1, 17, 4096, 32768])
@pytest.mark.parametrize(
    "dtype,mma", [(mx.bfloat16, True), (mx.bfloat16, False), (mx.float16, False), (mx.float32, False)]
)
@pytest.mark.parametrize("bits,group_size", PACKINGS)
def test_cuda_kernel_is_as_close_as_latent_attention(
    monkeypatch, close_bar, length, dtype, mma, bits, group_size
):
    """GLM-4.7-Flash's shape at the issue's lengths, outputs poisoned; at 17 two sequences (the
    cache views are strided: MLX copies them). bf16 through both paths: tensor cores (what runs)
    and the FMA path (USE_MMA off)."""
    monkeypatch.setattr(mla_decode_q_module, "USE_MMA", mma)
    batch = 2 if length == 17 else 1
    g = GLM
    args, kw = inputs(batch, g["heads"], g["r"], g["rd"], length, dtype, group_size=group_size, bits=bits)
    assert dict(mla_decode_q.launch("cuda", *args, **kw).template)["MMA"] == int(mma)
    got = mla_decode_q.run_kernel("cuda", *args, **kw, init_value=float("nan"))
    assert isinstance(got, tuple), got
    _check(got, args, kw, dtype, close_bar)


@pytest.mark.cuda
def test_cuda_kernel_is_what_runs():
    assert mla_decode_q.plan("cuda").path == "kernel", mla_decode_q.plan("cuda").reason
