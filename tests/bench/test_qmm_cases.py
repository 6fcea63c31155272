"""The qmm-order kernels' micro-benchmark cases: Qwen3-30B-A3B's top-8 expert shapes and
GLM-4.7-Flash's attention; the fused side turns quant.QMM_ORDER, QMM_DOWN and QMM_PIPELINED
on for its call only (on the CPU it runs the reference, so the sides agree; only the GPU
compares the kernels)."""

import mlx.core as mx
import pytest

from zmlx.bench import qmm_cases
from zmlx.kernels import quant


@pytest.fixture(scope="module")
def cases():
    return {c.kernel: c for c in qmm_cases.qmm_cases()}


def test_the_cases_have_the_models_decode_shapes(cases):
    assert set(cases) == {"moe_mlp (qmm)", "downproj_combine (qmm)", "mla_q_prep_embed"}
    assert cases["moe_mlp (qmm)"].stock().shape == (1, 1, 8, 768)
    assert cases["downproj_combine (qmm)"].stock().shape == (1, 1, 2048)
    q_s, q_pe, latent, k_pe = cases["mla_q_prep_embed"].stock()
    assert q_s.shape == (1, 20, 1, 512) and q_pe.shape == (1, 20, 1, 64) and latent.shape == (1, 1, 1, 512)


def test_the_fused_side_switches_qmm_order_for_its_call_only(cases, monkeypatch):
    monkeypatch.setattr(quant, "QMM_ORDER", False)
    monkeypatch.setattr(quant, "QMM_DOWN", False)
    monkeypatch.setattr(quant, "QMM_PIPELINED", False)
    for case in cases.values():
        got, want = case.fused(), case.stock()
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        assert all(mx.array_equal(g, w).item() for g, w in zip(got, want, strict=True)), case.kernel
        assert quant.QMM_ORDER is False
    with qmm_cases._qmm_order():
        assert quant.QMM_ORDER and quant.QMM_DOWN and quant.QMM_PIPELINED
    assert not (quant.QMM_ORDER or quant.QMM_DOWN or quant.QMM_PIPELINED)
