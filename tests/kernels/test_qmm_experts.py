"""moe_mlp and downproj_combine in qmm_sm80's order (quant.QMM_ORDER; csrc/qmm_gate_up.h,
csrc/qmm_down.h). From 8 (token, expert) rows stock's gather_qmm runs qmm_sm80 on affine
weights whose outputs are a multiple of 128 and rows of max(64, group) values; there the
kernels take the QMM variant (one warp per 8 outputs, each dot in qmm_sm80's order) and must
be bitwise stock on CUDA: top-8 families at decode (Qwen3-30B-A3B, GLM-4.5-Air, DeepSeek-V3)
and GLM-4.7-Flash's top-4 from 2 tokens. Without a GPU: which calls take the variant, that
moe_block's kernels (qmv only) step aside there, and that every variant compiles with NVRTC."""

import mlx.core as mx
import pytest
from toolchain_marks import needs_nvrtc

from zmlx.kernels import cuda_check, downproj_combine, moe_down, moe_gate_up, moe_mlp, quant
from zmlx.kernels.core import Launch, Skip
from zmlx.kernels.moe_mlp import quantized_experts

# (tokens, experts, k, expert rows I, model width D, group, bits): I and D multiples of 128
CASES = [
    (1, 32, 8, 768, 2048, 64, 4),  # Qwen3-30B-A3B's expert shapes (128 experts there)
    (1, 16, 8, 1408, 4096, 64, 4),  # GLM-4.5-Air's
    (2, 16, 4, 1536, 2048, 64, 4),  # GLM-4.7-Flash's, 2 tokens
    (3, 16, 4, 256, 384, 32, 4),  # 12 rows, groups of 32
    (1, 12, 8, 384, 256, 128, 4),  # groups of 128
    (1, 12, 8, 256, 512, 64, 8),  # 8-bit
]


def _gate_up(n, experts, k, i, d, gs, bits, dtype, seed=0, biases=False):
    x = mx.random.normal((n, d), key=mx.random.key(seed)).astype(dtype)
    inds = mx.random.randint(0, experts, (n, k), key=mx.random.key(seed + 1)).astype(mx.uint32)
    g = quantized_experts(experts, i, d, group_size=gs, bits=bits, dtype=dtype, seed=seed + 2)
    u = quantized_experts(experts, i, d, group_size=gs, bits=bits, dtype=dtype, seed=seed + 3)
    args = (x, inds, *g, *u)
    kw: dict = dict(group_size=gs, bits=bits)
    if biases:  # gpt-oss's kind of experts: projection biases and SwigluOAI
        pb = [
            (mx.random.normal((experts, i), key=mx.random.key(seed + j)) * 0.5).astype(dtype) for j in (4, 5)
        ]
        args, kw = (*args, *pb), {**kw, "oai": (1.702, 7.0)}
    return args, kw


def _down(n, experts, k, i, d, gs, bits, dtype, seed=0, shared=True, scores_in_t=False):
    h = mx.random.normal((n, k, i), key=mx.random.key(seed)).astype(dtype)
    inds = mx.random.randint(0, experts, (n, k), key=mx.random.key(seed + 1)).astype(mx.uint32)
    scores = mx.random.uniform(shape=(n, k), key=mx.random.key(seed + 2)) * 1.8
    w = quantized_experts(experts, d, i, group_size=gs, bits=bits, dtype=dtype, seed=seed + 3)
    out = mx.random.normal((n, d), key=mx.random.key(seed + 4)).astype(dtype) if shared else None
    return (h, inds, scores.astype(dtype) if scores_in_t else scores, *w, out), dict(group_size=gs, bits=bits)


def test_with_qmm_order_off_8_rows_take_the_reference(monkeypatch):
    """Off, 8 rows take the reference on CUDA (stock's tiled qmm is not followed)."""
    monkeypatch.setattr(quant, "QMM_ORDER", False)
    args, kw = _gate_up(*CASES[0], mx.bfloat16)
    assert "tiled qmm from 8 rows" in moe_mlp.launch("cuda", *args, **kw).reason
    args, kw = _down(*CASES[0], mx.bfloat16)
    assert "tiled qmm from 8 rows" in downproj_combine.launch("cuda", *args, **kw).reason


def test_with_qmm_down_off_the_down_rows_take_the_reference_and_say_why(monkeypatch):
    """QMM_DOWN off (its variant measured slower than stock): 8 rows of the down projection take
    the reference and say so; gate/up's variant still takes its rows."""
    monkeypatch.setattr(quant, "QMM_ORDER", True)
    monkeypatch.setattr(quant, "QMM_DOWN", False)
    args, kw = _down(*CASES[0], mx.bfloat16)
    assert "QMM_DOWN" in downproj_combine.launch("cuda", *args, **kw).reason
    assert downproj_combine.downproj_combine.variant_example("cuda") is None
    args, kw = _gate_up(*CASES[0], mx.bfloat16)
    assert dict(moe_mlp.launch("cuda", *args, **kw).template)["QMM"] is True


@pytest.mark.parametrize("case", CASES, ids=[str(c[:3]) for c in CASES])
def test_on_cuda_qmm_rows_launch_the_qmm_variant_8_outputs_a_warp(qmm_on, case):
    """moe_mlp: a warp per 8 (gate, up) outputs, 2 warps a block; downproj_combine: a block of k
    warps (one an expert) per 8 outputs. The qmv variant keeps its geometry."""
    n, _, k, i, d = case[:5]
    args, kw = _gate_up(*case, mx.bfloat16)
    spec = moe_mlp.launch("cuda", *args, **kw)
    assert isinstance(spec, Launch) and dict(spec.template)["QMM"] is True
    assert spec.grid == (n * k * (i // 8) * 32, 1, 1) and spec.output_shapes == [(n, k, i)]
    assert spec.threadgroup == (64, 1, 1) and spec.grid[0] % 64 == 0
    args, kw = _down(*case, mx.bfloat16)
    spec = downproj_combine.launch("cuda", *args, **kw)
    assert isinstance(spec, Launch) and dict(spec.template)["QMM"] is True
    assert spec.grid == (n * (d // 8) * 32 * k, 1, 1) and spec.output_shapes == [(n, d)]
    assert spec.threadgroup == (32 * k, 1, 1)
    assert dict(moe_mlp.launch("metal", *_gate_up(*case, mx.bfloat16)[0], **kw).template)["QMM"] is False


def test_with_qmm_pipelined_off_gate_up_keeps_the_plain_loop_in_blocks_of_256(qmm_on, monkeypatch):
    """QMM_PIPELINED off (its body not yet run on a GPU): the variant that ran bitwise on the
    H200, the plain loop (PIPE false) in blocks of 256."""
    monkeypatch.setattr(quant, "QMM_PIPELINED", False)
    spec = moe_mlp.launch("cuda", *_gate_up(*CASES[0], mx.bfloat16)[0], group_size=64, bits=4)
    assert dict(spec.template)["QMM"] is True and dict(spec.template)["PIPE"] is False
    assert spec.threadgroup == (256, 1, 1)


def test_qmv_rows_keep_a_warp_an_output_in_blocks_of_256(qmm_on):
    for case in ((1, 16, 4, 256, 256, 64, 4), (1, 16, 4, 256, 512, 64, 8)):  # 4 rows: qmv
        _, _, k, i, d, gs, bits = case
        spec = moe_mlp.launch("cuda", *_gate_up(*case, mx.bfloat16)[0], group_size=gs, bits=bits)
        assert dict(spec.template)["QMM"] is False and spec.threadgroup == (256, 1, 1)
        assert spec.grid == (k * i * 32, 1, 1)
        spec = downproj_combine.launch("cuda", *_down(*case, mx.bfloat16)[0], group_size=gs, bits=bits)
        assert dict(spec.template)["QMM"] is False and spec.threadgroup == (256, 1, 1)
        assert spec.grid == (d * 32, 1, 1)


def test_qmm_down_takes_the_reference_past_32_experts_a_token(qmm_on):
    """downproj_combine's QMM block holds a warp per expert: past 32 (1024 threads), the reference."""
    args, kw = _down(1, 48, 40, 256, 128, 64, 4, mx.bfloat16)
    got = downproj_combine.launch("cuda", *args, **kw)
    assert isinstance(got, Skip) and "40 experts a token" in got.reason


def test_qmv_rows_and_stocks_other_kernels_are_not_qmm(qmm_on):
    """Below 8 rows stock runs qmv (the qmv variant); from mlx-lm's sort (64 rows), outputs
    not a multiple of 128, rows not of max(64, group), float32 activations, scales in another
    dtype: stock's kernel is another, so the reference; unquantized experts keep gemv's order."""
    args, kw = _gate_up(1, 16, 4, 256, 256, 64, 4, mx.bfloat16)  # 4 rows: qmv
    assert dict(moe_mlp.launch("cuda", *args, **kw).template)["QMM"] is False
    for case, why in [
        ((8, 16, 8, 256, 256, 64, 4), "64 rows"),
        ((1, 16, 8, 200, 256, 64, 4), "outputs"),
        ((1, 16, 8, 256, 96, 32, 4), "row width"),
    ]:
        args, kw = _gate_up(*case, mx.bfloat16)
        assert isinstance(moe_mlp.launch("cuda", *args, **kw), Skip), why
    args, kw = _gate_up(1, 16, 8, 256, 256, 64, 4, mx.float32)
    assert isinstance(moe_mlp.launch("cuda", *args, **kw), Skip)
    args, kw = _gate_up(1, 16, 8, 256, 256, 64, 4, mx.bfloat16)
    f16 = [a.astype(mx.float16) if j in (3, 4, 6, 7) else a for j, a in enumerate(args)]
    assert isinstance(moe_mlp.launch("cuda", *f16, **kw), Skip)
    args, kw = _gate_up(1, 16, 8, 256, 256, None, None, mx.bfloat16)  # stock's gemv up to 64 rows
    assert dict(moe_mlp.launch("cuda", *args, **kw).template)["QMM"] is False


def test_moe_blocks_kernels_step_aside_from_qmm_rows(qmm_on, monkeypatch):
    """With quant.QMM_BLOCK off, moe_gate_up and moe_down follow qmv only: where the expert
    kernels would take the QMM variant they take the reference, and say so (on:
    test_moe_block_qmm.py)."""
    monkeypatch.setattr(quant, "QMM_BLOCK", False)
    x, inds, *w = _gate_up(1, 16, 8, 1536, 2048, 64, 4, mx.bfloat16)[0]  # one token, top-8
    shared = [
        quantized_experts(1, 1024, 2048, group_size=64, bits=4, dtype=mx.bfloat16, seed=s) for s in (7, 8)
    ]
    sgate, sup = ([a[0] for a in side] for side in shared)
    got = moe_gate_up.launch(
        "cuda", x, inds, *w, *sgate, *sup, group_size=64, bits=4, shared_group_size=64, shared_bits=4
    )
    assert isinstance(got, Skip) and "qmm_sm80" in got.reason
    h, inds, scores, *dw, _ = _down(1, 16, 8, 1536, 2048, 64, 4, mx.bfloat16)[0]
    resid = mx.zeros((1, 2048), dtype=mx.bfloat16)
    got = moe_down.launch("cuda", h, inds, scores, *dw, resid, group_size=64, bits=4)
    assert isinstance(got, Skip) and "qmm_sm80" in got.reason


@needs_nvrtc
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=["4-bit", "8-bit"])
def test_every_qmm_variant_compiles(qmm_on, case, dtype, monkeypatch):
    for pipelined in (False, True):
        monkeypatch.setattr(quant, "QMM_PIPELINED", pipelined)
        for args, kw in (_gate_up(*case, dtype), _gate_up(*case, dtype, biases=True)):
            spec = moe_mlp.launch("cuda", *args, **kw)
            assert dict(spec.template)["QMM"] is True and dict(spec.template)["PIPE"] is pipelined
            cuda_check.compile_launch(moe_mlp.moe_mlp, spec)  # raises with NVRTC's log
    for shared, in_t in ((True, False), (False, True)):
        args, kw = _down(*case, dtype, shared=shared, scores_in_t=in_t)
        spec = downproj_combine.launch("cuda", *args, **kw)
        assert dict(spec.template)["QMM"] is True
        cuda_check.compile_launch(downproj_combine.downproj_combine, spec)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("case", CASES, ids=[str(c[:3]) + f"-g{c[5]}-b{c[6]}" for c in CASES])
@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_cuda_qmm_gate_up_is_bitwise_stock(qmm_on, case, dtype, pipelined, monkeypatch):
    monkeypatch.setattr(quant, "QMM_PIPELINED", pipelined)
    for biases in (False, True):
        args, kw = _gate_up(*case, dtype, seed=case[3] + case[6], biases=biases)
        assert dict(moe_mlp.launch("cuda", *args, **kw).template)["QMM"] is True
        got = moe_mlp.moe_mlp.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
        want = moe_mlp.reference(*args, **kw)
        assert got.dtype == dtype and got.shape == want.shape
        assert mx.array_equal(got, want).item(), (biases, mx.abs(got.astype(mx.float32) - want).max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("case", CASES, ids=[str(c[:3]) + f"-g{c[5]}-b{c[6]}" for c in CASES])
def test_cuda_qmm_down_combine_is_bitwise_stock(qmm_on, case, dtype):
    for shared, in_t in ((True, False), (False, True), (True, True)):
        args, kw = _down(*case, dtype, seed=case[4] + case[6], shared=shared, scores_in_t=in_t)
        assert dict(downproj_combine.launch("cuda", *args, **kw).template)["QMM"] is True
        got = downproj_combine.downproj_combine.run_kernel("cuda", *args, init_value=float("nan"), **kw)
        want = downproj_combine.reference(*args, **kw)
        assert got.dtype == dtype and got.shape == want.shape
        assert mx.array_equal(got, want).item(), (
            shared,
            in_t,
            mx.abs(got.astype(mx.float32) - want).max().item(),
        )


@pytest.mark.parametrize("kernel", [moe_mlp.moe_mlp, downproj_combine.downproj_combine], ids=lambda k: k.name)
def test_the_self_check_runs_a_qmm_call_when_the_switch_is_on(kernel, monkeypatch):
    """With QMM_ORDER on, each kernel's variant_example on CUDA takes the QMM variant (the
    pre-use check then covers that instantiation too); off, or elsewhere, there is none."""
    monkeypatch.setattr(quant, "QMM_ORDER", False)
    monkeypatch.setattr(quant, "QMM_DOWN", True)
    assert kernel.variant_example("cuda") is None
    monkeypatch.setattr(quant, "QMM_ORDER", True)
    assert kernel.variant_example("metal") is None
    args, kw = kernel.variant_example("cuda")
    assert dict(kernel.launch("cuda", *args, **kw).template)["QMM"] is True
    got, want = kernel(*args, **kw), kernel.reference(*args, **kw)  # the CPU: the reference
    assert mx.array_equal(got, want).item()
