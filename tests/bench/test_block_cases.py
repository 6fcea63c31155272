"""The block kernels' micro-benchmark cases have GLM-4.7-Flash's decode shapes (on the CPU the
fused side runs its reference, so only the GPU compares the two sides)."""

import pytest

from zmlx.bench import block_cases

# the kernels the block patterns call through prepared launches
PREPARED = (
    "norm_router_gates",
    "moe_gate_up_route",
    "norm_router",
    "moe_gate_up",
    "moe_down",
    "norm_qkv_a",
    "mla_q_prep_nope",
)


@pytest.fixture(scope="module")
def cases():
    return {c.kernel: c for c in block_cases.moe_block_cases() + block_cases.mla_block_cases()}


def test_every_block_kernel_has_a_case(cases):
    prepared = set(PREPARED)
    assert set(cases) == prepared | {f"{k} (prepared)" for k in prepared} | {"mla_q_prep (close)"}


def test_a_prepared_case_computes_what_the_public_function_does(cases):
    # on the CPU both run the reference; the prepared call must hand it the same arguments
    import mlx.core as mx

    for name in PREPARED:
        want, got = cases[name].fused(), cases[f"{name} (prepared)"].fused()
        want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
        assert all(mx.array_equal(w, g).item() for w, g in zip(want, got, strict=True)), name


def test_the_cases_have_glm47_flash_decode_shapes(cases):
    h, xn, inds, scores = cases["norm_router"].stock()
    assert h.shape == xn.shape == (1, 1, 2048) and inds.shape == scores.shape == (1, 1, 4)
    hr, hs = cases["moe_gate_up"].stock()
    assert hr.shape == (1, 1, 4, 1536) and hs.shape == (1, 1, 1536)
    h, xn, gates = cases["norm_router_gates"].stock()
    assert h.shape == xn.shape == (1, 1, 2048) and gates.shape == (1, 1, 64)
    hr, hs, inds, scores = cases["moe_gate_up_route"].stock()
    assert (
        hr.shape == (1, 1, 4, 1536) and hs.shape == (1, 1, 1536) and inds.shape == scores.shape == (1, 1, 4)
    )
    assert (inds < 8).all().item()  # the experts stored
    assert cases["moe_down"].stock().shape == (1, 1, 2048)
    q_a, ckv = cases["norm_qkv_a"].stock()
    assert q_a.shape == (1, 1, 768) and ckv.shape == (1, 1, 576)
    q_nope, q_pe, latent, k_pe = cases["mla_q_prep_nope"].stock()
    assert q_nope.shape == (1, 20, 1, 192) and q_pe.shape == (1, 20, 1, 64)
    qv, q_pe, latent, k_pe = cases["mla_q_prep (close)"].stock()
    assert qv.shape == (1, 20, 512) and q_pe.shape == (1, 20, 1, 64)
    assert latent.shape == (1, 1, 1, 512) and k_pe.shape == (1, 1, 1, 64)
