"""mla_decode_len: mla_decode over a static cache's whole buffers with the valid length a device
input, spread over all the capacity's chunks (chunk_span). Each of its reference's chunks is
mla_decode's reference over that chunk's slice, bitwise; chunks past the length are neutral
and the combine ignores them, so combined it is mla_decode's over the valid slice up to the
chunking of the sum; the Metal body (emulated) and, on the GPU, the CUDA body match the
reference."""

import mlx.core as mx
import pytest

from zmlx.kernels import metal_emu
from zmlx.kernels.core import Launch, Skip
from zmlx.kernels.mla_attention import chunk_size, decode_reference, mla_decode, unembed_reference
from zmlx.kernels.mla_decode_len import EMPTY_MAX, chunk_span, mla_decode_len
from zmlx.kernels.moe_mlp import quantized_experts

CAP = 256  # a static cache's first bucket: 8 chunks of 32


def _problem(cap, heads=3, r=128, rd=64, dtype=mx.bfloat16, seed=0, b=1):
    ks = mx.random.split(mx.random.key(seed), 4)
    qv = mx.random.normal((b, heads, r), key=ks[0])
    q_pe = (mx.random.normal((b, heads, 1, rd), key=ks[1]) * 0.3).astype(dtype)
    lat = mx.random.normal((b, 1, cap, r), key=ks[2]).astype(dtype)
    kpe = mx.random.normal((b, 1, cap, rd), key=ks[3]).astype(dtype)
    return qv, q_pe, lat, kpe, 128**-0.5


def _n(length):
    return mx.array([length], mx.int32)


@pytest.mark.parametrize("length", [1, 70, 200, CAP])
def test_reference_chunks_are_mla_decode_over_their_slices(length):
    """Chunk c's partials are mla_decode's reference over positions [c * span, (c + 1) * span)
    of the valid ones, bitwise (each slice is one mla_decode chunk: span <= 32); the chunks
    past them are neutral (m EMPTY_MAX, l 0, o 0); combined, the output is close to the valid
    slice's (another chunking of the same sums) and finite (a neutral chunk adds exact zeros)."""
    qv, q_pe, lat, kpe, scale = _problem(CAP, seed=length)
    span = chunk_span(CAP, length)
    assert span == {1: 16, 70: 16, 200: 32, CAP: 32}[length]
    o, m, lsum = mla_decode_len.reference(qv, q_pe, lat, kpe, _n(length), scale=scale)
    assert o.shape == (1, 8, 3, 128) and m.shape == (1, 8, 3)
    c = -(-length // span)
    for i in range(c):
        a, b = i * span, min((i + 1) * span, length)
        so, sm, sl = decode_reference(qv, q_pe, lat[:, :, a:b], kpe[:, :, a:b], scale=scale)
        assert so.shape[1] == 1
        for got, want in ((o[:, i : i + 1], so), (m[:, i : i + 1], sm), (lsum[:, i : i + 1], sl)):
            assert mx.array_equal(got, want).item(), (length, i)
    assert (m[:, c:] == EMPTY_MAX).all().item() and (lsum[:, c:] == 0).all().item()
    assert (o[:, c:] == 0).all().item()
    w = quantized_experts(3, 40, 128, dtype=mx.bfloat16, seed=3, group_size=64, bits=4)
    kw = dict(dtype=mx.float32, group_size=64, bits=4)
    out = unembed_reference(o, m, lsum, *w, **kw)
    assert mx.isfinite(out).all().item()
    whole = decode_reference(qv, q_pe, lat[:, :, :length], kpe[:, :, :length], scale=scale)
    assert mx.allclose(out, unembed_reference(*whole, *w, **kw), rtol=1e-5, atol=1e-5).item()


def test_chunk_span_spreads_the_valid_positions_over_every_chunk():
    """The capacity's chunk size when all positions count; else a multiple of 16, at most
    that size, that covers the valid ones with the capacity's chunks; half a bucket of 8192
    (GLM-4.7-Flash after a 4096-token prompt) keeps all 128 chunks busy."""
    for cap in (256, 4096, 8192, 65536):
        ch, c = chunk_size(cap), -(-cap // chunk_size(cap))
        assert chunk_span(cap, cap) == ch
        for length in (0, 1, 15, 16, 17, cap // 2 + 1, cap - 1):
            span = chunk_span(cap, length)
            assert span % 16 == 0 and 16 <= span <= ch
            assert span * c >= length
            assert span == 16 or span - 16 < -(-length // c)  # the smallest such multiple
    assert chunk_span(8192, 4096) * 128 == 4096


def test_the_length_stays_on_the_device_and_changes_no_shape():
    """Under mx.compile the length is an input: one trace for every length."""
    qv, q_pe, lat, kpe, scale = _problem(CAP, seed=5)
    traces = []

    def step(n):
        traces.append(1)
        return mla_decode_len.reference(qv, q_pe, lat, kpe, n, scale=scale)

    f = mx.compile(step)
    for length in (1, 33, 200):
        got = f(_n(length))
        want = mla_decode_len.reference(qv, q_pe, lat, kpe, _n(length), scale=scale)
        assert all(mx.array_equal(a, b).item() for a, b in zip(got, want))
    assert len(traces) == 1


def test_launch_takes_the_length_last_and_fixes_the_chunks_by_capacity():
    qv, q_pe, lat, kpe, scale = _problem(CAP)
    spec = mla_decode_len.launch("metal", qv, q_pe, lat, kpe, _n(3), scale=scale)
    assert isinstance(spec, Launch) and spec.inputs[-1].dtype == mx.int32 and len(spec.inputs) == 5
    assert spec.output_shapes == mla_decode.launch("metal", qv, q_pe, lat, kpe, scale=scale).output_shapes
    assert spec.output_shapes[1] == (1, 8, 3)
    for bad in (3, mx.array([3, 4], mx.int32), mx.array([3.0])):
        assert isinstance(mla_decode_len.launch("metal", qv, q_pe, lat, kpe, bad, scale=scale), Skip)
    assert (
        "qv"
        in mla_decode_len.launch("metal", qv.astype(mx.bfloat16), q_pe, lat, kpe, _n(3), scale=scale).reason
    )


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("length", [1, 70, 150, CAP])
def test_metal_body_matches_its_reference(tmp_path_factory, dtype, length):
    """The body through the emulation (outputs poisoned): lengths that leave whole chunks empty
    (1: seven of eight; 70, 150: a partial chunk then empty ones) and the whole capacity."""
    qv, q_pe, lat, kpe, scale = _problem(CAP, dtype=dtype, seed=length)
    args = (qv, q_pe, lat, kpe, _n(length))
    got = metal_emu.run(mla_decode_len, *args, scale=scale, workdir=tmp_path_factory.getbasetemp())
    want = mla_decode_len.reference(*args, scale=scale)
    c = -(-length // chunk_span(CAP, length))
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        tol = mla_decode_len.tolerance
        assert mx.allclose(g, w, rtol=tol, atol=tol).item()
    assert (got[1][:, c:] == EMPTY_MAX).all().item() and (got[2][:, c:] == 0).all().item()
    assert (got[0][:, c:] == 0).all().item()


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_metal_body_over_a_batch_of_two(tmp_path_factory):
    """Batch rows are capacity apart in the buffers: the second sequence reads its own."""
    qv, q_pe, lat, kpe, scale = _problem(CAP, seed=11, b=2)
    args = (qv, q_pe, lat, kpe, _n(40))
    got = metal_emu.run(mla_decode_len, *args, scale=scale, workdir=tmp_path_factory.getbasetemp())
    want = mla_decode_len.reference(*args, scale=scale)
    for g, w in zip(got, want):
        assert mx.allclose(g, w, rtol=1e-4, atol=1e-4).item()


GLM = dict(heads=20, r=512, rd=64)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])  # bf16: the tensor-core path
@pytest.mark.parametrize("cap,length", [(256, 1), (256, 17), (256, 256), (4096, 1000), (8192, 5000)])
def test_cuda_body_matches_the_shape_length_path(dtype, cap, length):
    """GLM-4.7-Flash's shape on the GPU, outputs poisoned: the partials match the reference
    (the valid positions spread over the capacity's chunks), and are the shape-length
    kernel's over the valid slice, bitwise, where both split it alike (the same code over the
    same positions: (256, 1), (256, 256), (8192, 5000)); the rest neutral."""
    qv, q_pe, lat, kpe, scale = _problem(cap, dtype=dtype, seed=length, **GLM)
    got = mla_decode_len.run_kernel(
        "cuda", qv, q_pe, lat, kpe, _n(length), scale=scale, init_value=float("nan")
    )
    assert not isinstance(got, Skip)
    want = mla_decode_len.reference(qv, q_pe, lat, kpe, _n(length), scale=scale)
    for g, w in zip(got, want):
        tol = mla_decode_len.tolerance
        assert mx.allclose(g, w, rtol=tol, atol=tol).item()
    span = chunk_span(cap, length)
    c = -(-length // span)
    assert (got[1][:, c:] == EMPTY_MAX).all().item() and (got[2][:, c:] == 0).all().item()
    assert (got[0][:, c:] == 0).all().item()
    if span == chunk_size(length) or length <= min(span, chunk_size(length)):  # the same chunks
        sl = (lat[:, :, :length], kpe[:, :, :length])
        shape_len = mla_decode.run_kernel("cuda", qv, q_pe, *sl, scale=scale, init_value=float("nan"))
        for g, s in zip(got, shape_len):
            assert mx.array_equal(g[:, :c], s).item()


@pytest.mark.cuda
def test_cuda_kernel_is_what_runs():
    assert mla_decode_len.plan("cuda").path == "kernel", mla_decode_len.plan("cuda").reason
