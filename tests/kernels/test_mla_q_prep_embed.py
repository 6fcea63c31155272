"""mla_q_prep_embed: mla_q_prep_nope's launch with embed_q (in qmm_sm80's order) and SDPA's query
scale in it, every value stock's. Without a GPU: its reference is stock's ops on mlx-lm's
pieces (q_nope -> embed_q -> times T(scale)), the launch's regime (quant.QMM_ORDER, stock's
qmm_sm80 on CUDA), every CUDA variant compiles with NVRTC, and the Metal body (float32 sums,
close) through the emulation is as close to float32 as stock. `cuda` tests: all four outputs
bitwise the reference, outputs poisoned first."""

import mlx.core as mx
import pytest
from test_mla_q_prep import Q4, Q8, _nope, _problem, _truth
from toolchain_marks import needs_nvrtc

from zmlx.kernels import cuda_check, metal_emu, quant
from zmlx.kernels.core import Launch, Skip
from zmlx.kernels.mla_q_prep import reference_nope
from zmlx.kernels.mla_q_prep_embed import launch, mla_q_prep_embed, reference

SHAPES = [  # (batch, heads, q_lora_rank, nope, rope_dims, kv_lora_rank)
    (1, 20, 768, 192, 64, 512),  # GLM-4.7-Flash
    (1, 8, 256, 128, 32, 256),
    (1, 9, 320, 64, 32, 128),  # odd heads
    (1, 12, 256, 128, 64, 384),  # three embed slices of 128 rows
]
G128 = dict(group_size=128, bits=4)
PACKINGS = [(Q4, Q4), (Q8, Q8), (None, G128)]  # (q_b_proj, embed_q)
# Stock's qmm_sm80 cases (a group narrower than nope: wider ones take MLX's sm90 qmm on the
# H200), one sequence: (shape, (q_b_proj, embed_q) packings)
CUDA_CASES = [
    (SHAPES[0], (Q4, Q4)),
    (SHAPES[0], (Q8, Q8)),
    (SHAPES[0], (None, dict(group_size=64, bits=4))),
    (SHAPES[1], (Q4, dict(group_size=64, bits=8))),
    (SHAPES[2], (Q8, Q4)),
    (SHAPES[3], (None, dict(group_size=32, bits=8))),
]


def test_reference_is_embed_q_then_sdpas_scale_on_the_nope_variants_values():
    args, kw = _problem(SHAPES[1], mx.bfloat16, PACKINGS[0], 5)
    q_s, *rest = reference(*args, **kw)
    nope_args, nope_kw = _nope(args, kw)
    q_nope, *nope_rest = reference_nope(*nope_args, **nope_kw)
    eq_w, eq_s, eq_b = args[7:10]
    packing = dict(group_size=kw["embed_group_size"], bits=kw["embed_bits"])
    q = mx.quantized_matmul(q_nope, eq_w, eq_s, eq_b, transpose=True, **packing)
    assert q_s.dtype == mx.bfloat16 and q_s.shape == (1, 8, 1, 256)
    assert mx.array_equal(q_s, q * mx.array(kw["scale"], mx.bfloat16)).item()
    assert not mx.array_equal(q_s, q).item()  # the scale is in
    assert all(mx.array_equal(a, b).item() for a, b in zip(rest, nope_rest))


def test_the_launch_waits_for_qmm_order(qmm_on, monkeypatch):
    args, kw = _problem(SHAPES[0], mx.bfloat16, PACKINGS[0], 1)
    spec = launch("cuda", *args, **kw)
    assert isinstance(spec, Launch) and spec.output_shapes[0] == (1, 20, 1, 512)
    assert spec.output_dtypes[0] == mx.bfloat16 and dict(spec.template)["ES"] == 4
    assert isinstance(launch("cpu", *args, **kw), Launch)  # the reference runs there
    assert isinstance(launch("metal", *args, **kw), Launch)  # float32 sums there: close
    monkeypatch.setattr(quant, "QMM_ORDER", False)
    assert "QMM_ORDER is off" in launch("cuda", *args, **kw).reason


def test_on_cuda_only_stocks_qmm_sm80_embeds_launch(qmm_on):
    """Fewer than 8 sequence-heads (stock's qmv), an unquantized embed_q, float32, groups as
    wide as nope (stock's sm90 qmm), more than one sequence: skips."""
    args, kw = _problem(SHAPES[1], mx.bfloat16, (Q4, G128), 7)  # nope 128, groups of 128
    assert "sm90" in launch("cuda", *args, **kw).reason
    assert isinstance(launch("cpu", *args, **kw), Launch)  # the CPU's reference is stock's anyway
    args, kw = _problem((2, 8, 256, 128, 32, 256), mx.bfloat16, (Q4, Q4), 8)
    assert isinstance(launch("cuda", *args, **kw), Skip)
    args, kw = _problem((1, 3, 96, 64, 16, 128), mx.bfloat16, PACKINGS[0], 2)
    assert "not stock's qmm_sm80" in launch("cuda", *args, **kw).reason
    args, kw = _problem(SHAPES[1], mx.bfloat16, (Q4, None), 3)
    assert isinstance(launch("cuda", *args, **kw), Skip)
    args, kw = _problem(SHAPES[1], mx.float32, PACKINGS[0], 4)
    assert isinstance(launch("cuda", *args, **kw), Skip)


@needs_nvrtc
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("shape,packings", CUDA_CASES)
def test_every_cuda_case_launches_and_compiles(qmm_on, dtype, shape, packings):
    args, kw = _problem(shape, dtype, packings, 6)
    spec = launch("cuda", *args, **kw)
    assert isinstance(spec, Launch), spec
    report = cuda_check.compile_launch(mla_q_prep_embed, spec, resources=True)
    assert "0 bytes spill stores" in report, report


@pytest.mark.cuda
@pytest.mark.parametrize("shape,packings", CUDA_CASES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("position,yarn", [(0, None), (4096, "deepseek_v3")])
def test_cuda_kernel_is_bitwise_stock(qmm_on, shape, dtype, packings, position, yarn):
    args, kw = _problem(shape, dtype, packings, sum(shape) + position, position, yarn)
    spec = launch("cuda", *args, **kw)
    assert isinstance(spec, Launch), spec
    got = mla_q_prep_embed.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    want = reference(*args, **kw)
    for name, g, w in zip(("q_s", "q_pe", "kv_latent", "k_pe"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert mx.array_equal(g, w).item(), (name, mx.abs(g.astype(mx.float32) - w).max().item())


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize(
    "shape,dtype,packings",
    [
        (SHAPES[1], mx.bfloat16, PACKINGS[0]),
        (SHAPES[2], mx.float16, PACKINGS[1]),
        (SHAPES[3], mx.float32, PACKINGS[2]),
    ],
)
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, qmm_on, shape, dtype, packings):
    args, kw = _problem(shape, dtype, packings, sum(shape))
    got = metal_emu.run(mla_q_prep_embed, *args, workdir=tmp_path_factory.getbasetemp(), **kw)  # poisoned
    want = reference(*args, **kw)
    qv, *truth = _truth(*args, **kw)
    truth = [(qv * kw["scale"])[:, :, None, :], *truth]  # q_s: embed_q's output times the scale
    for name, g, w, t in zip(("q_s", "q_pe", "kv_latent", "k_pe"), got, want, truth):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert not mx.any(mx.isnan(g.astype(mx.float32))).item(), name
        truth_f32, bar = close_bar(lambda *a, w=w, **k: w, lambda *a, t=t, **k: t, args, kw, dtype)
        assert mx.abs(g.astype(mx.float32) - truth_f32).max().item() <= bar, name


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_metal_self_check_example_passes(tmp_path_factory, qmm_on):
    args, kw = mla_q_prep_embed.example()
    got = metal_emu.run(mla_q_prep_embed, *args, workdir=tmp_path_factory.getbasetemp(), **kw)
    tol = mla_q_prep_embed.tolerance
    assert all(mx.allclose(g, w, rtol=tol, atol=tol).item() for g, w in zip(got, reference(*args, **kw)))
