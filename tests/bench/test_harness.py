"""The harness: interleaved variants, fidelity against control, unsafe opt-in."""

import pytest

from zmlx.bench.harness import CONTROL, Variant, make_prompt, measure


def test_variants_are_measured_with_fidelity_against_control(tiny_q4):
    model, tok = tiny_q4
    results = measure(
        model,
        tok,
        [CONTROL, Variant("control_repeat"), Variant("both", ("moe_router", "moe_combine"))],
        runs=2,
        max_tokens=12,
        prompt_tokens=9,
    )
    assert [r.variant.name for r in results] == ["control", "control_repeat", "both"]
    for r in results:
        assert len(r.runs) == 2 and all(x.decode_tps > 0 and x.generated_tokens == 12 for x in r.runs)
        assert r.fidelity == {"verdict": "PASS", "identical": 12, "total": 12, "first_divergence": None}
        assert r.kernels_per_token is None and "CUDA" in r.kernels_note
    assert results[0].patch is None
    assert results[2].patch["patterns"]["moe_router"]["patched"]
    d = results[2].to_dict()
    dec = d["summary"]["decode_tps"]
    assert dec["min"] <= dec["median"] <= dec["max"]


def test_unsafe_variant_is_skipped_unless_allowed(tiny_q4):
    model, tok = tiny_q4
    risky = Variant("risky", ("moe_router",), unsafe=True)
    skipped = measure(model, tok, [CONTROL, risky], runs=1, max_tokens=4)[1]
    assert skipped.skipped and "--allow-unsafe" in skipped.skipped and not skipped.runs
    assert skipped.to_dict()["skipped"] == skipped.skipped
    ran = measure(model, tok, [CONTROL, risky], runs=1, max_tokens=4, allow_unsafe=True)[1]
    assert ran.skipped is None and len(ran.runs) == 1


def test_a_diverging_variant_fails(tiny_q4, monkeypatch):
    from zmlx.patch.patterns import moe_router as pattern_module

    real = pattern_module.moe_router
    monkeypatch.setattr(pattern_module, "moe_router", lambda g, b, **kw: real(-g, b, **kw))
    model, tok = tiny_q4
    bad = measure(model, tok, [CONTROL, Variant("bad", ("moe_router",))], runs=1, max_tokens=16)[1]
    assert bad.fidelity["verdict"] == "FAIL"
    assert bad.fidelity["first_divergence"]["position"] == bad.fidelity["identical"] < 16


def test_first_variant_must_be_control(tiny_q4):
    model, tok = tiny_q4
    with pytest.raises(ValueError, match="first variant must be stock"):
        measure(model, tok, [Variant("x", ("moe_router",))], runs=1, max_tokens=2)


def test_prompt_is_seeded_and_avoids_special_ids():
    a = make_prompt(4096, 50, seed=3, avoid=[0])
    assert a == make_prompt(4096, 50, seed=3, avoid=[0]) != make_prompt(4096, 50, seed=4)
    assert len(a) == 50 and all(300 <= t < 4096 for t in a)
