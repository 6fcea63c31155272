"""The harness: interleaved variants, fidelity against control, unsafe opt-in, issue time."""

import math
import time

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
    plain = Variant("plain", ("moe_router",))
    done = []
    results = measure(
        model, tok, [CONTROL, risky, plain], runs=1, max_tokens=4, on_done=lambda c, r: done.append((c, r))
    )
    skipped = results[1]
    assert skipped.skipped and "--allow-unsafe" in skipped.skipped and not skipped.runs
    # on_done: every variant after the control once, against the control; the skipped one too
    assert [r.variant.name for _, r in done] == ["plain", "risky"]
    assert all(c is results[0] for c, _ in done)
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


def test_issue_time_is_recorded_for_stock_and_patched_with_compiled_decodes_counters(tiny_q4):
    model, tok = tiny_q4
    plain, compiled = Variant("plain", ("moe_router",)), Variant("compiled", ("compiled_decode",))
    steps: list[str] = []
    control, p, c = measure(
        model, tok, [CONTROL, plain, compiled], runs=2, max_tokens=12, prompt_tokens=9, on_step=steps.append
    )
    # after the timed runs, before the kernel counts (CUPTI, once attached, slows every launch)
    kinds = [s.split()[0] for s in steps]
    assert kinds[-6:] == ["issue"] * 3 + ["kernels"] * 3 and kinds[-7] == "run"
    for r in (control, p, c):
        assert math.isfinite(r.issue_ms_per_step) and r.issue_ms_per_step > 0
        assert 0 < r.build_ms_per_step <= r.issue_ms_per_step
        assert r.to_dict()["issue_ms_per_step"] == r.issue_ms_per_step
        assert r.to_dict()["build_ms_per_step"] == r.build_ms_per_step
    assert control.compiled_decode is None and p.compiled_decode is None
    # 9 + 12 positions fit one capacity bucket: one trace, even though mlx-lm's generate feeds
    # the prompt's last token as int32 and sampled tokens as uint32
    assert c.compiled_decode["traces"] == 1 and c.compiled_decode["compiled_steps"] > 0
    assert c.compiled_decode["stock_steps"] == {} and c.to_dict()["compiled_decode"] == c.compiled_decode


def test_issue_time_counts_the_issue_not_the_evaluation(tiny_q4, monkeypatch):
    """A slow mx.eval (the step's evaluation) must not show; a slow mx.async_eval (the issue's
    last call) must: each check fails if the timer is drawn around the wrong calls."""
    import mlx.core as mx

    from zmlx.bench import issue_time

    model, _ = tiny_q4
    prompt = mx.array(make_prompt(model.args.vocab_size, 9))
    pause = 0.2
    real_eval, real_async = mx.eval, mx.async_eval

    def slow(real):
        def call(*args):
            time.sleep(pause)
            return real(*args)

        return call

    monkeypatch.setattr(mx, "eval", slow(real_eval))
    times = issue_time.issue_times(model, prompt, steps=3, warm=1)
    assert len(times.issue_ms) == len(times.build_ms) == 3 and max(times.issue_ms) < pause * 1e3
    monkeypatch.setattr(mx, "eval", real_eval)
    monkeypatch.setattr(mx, "async_eval", slow(real_async))
    times = issue_time.issue_times(model, prompt, steps=3, warm=1)
    assert min(times.issue_ms) >= pause * 1e3 > max(times.build_ms)  # build: before async_eval


def _raising(error: Exception):
    """A stand-in for a measurement that fails as `error`."""

    def measure_it(*a, **k):
        raise error

    return measure_it


def test_a_failing_measurement_after_the_runs_keeps_the_runs_and_says_why(tiny_q4, monkeypatch):
    """The issue-time steps and the kernel count come after the timed runs: where one raises
    (on 2026-12-01 the issue-time steps ran out of GPU memory at a 32k prompt and the runs were
    lost), its figures are None with the reason in one line, and the runs and verdicts stay."""
    from zmlx.bench import harness

    boom = _raising(RuntimeError("cudaMallocAsync(&data, size, stream) failed: out of memory\nmore"))
    monkeypatch.setattr(harness, "issue_times", boom)
    monkeypatch.setattr(harness, "profile_decode", boom)
    model, tok = tiny_q4
    steps: list[str] = []
    control, both = measure(
        model,
        tok,
        [CONTROL, Variant("both", ("moe_router",))],
        runs=1,
        max_tokens=6,
        prompt_tokens=9,
        on_step=steps.append,
    )
    for r in (control, both):
        assert len(r.runs) == 1 and r.fidelity["verdict"] == "PASS"
        assert r.issue_ms_per_step is None and r.build_ms_per_step is None
        oom = "cudaMallocAsync(&data, size, stream) failed: out of memory"
        assert r.issue_note == f"the issue-time steps failed: RuntimeError: {oom}"
        assert r.kernels_per_token is None and r.kernels_note.startswith(
            "the kernel count failed: RuntimeError"
        )
        assert r.to_dict()["issue_note"] == r.issue_note
    assert any(s.startswith("issue both: the issue-time steps failed") for s in steps)
    from zmlx.matrix.entries import measured
    from zmlx.models import ModelSource

    base = dict(notes="", params={}, git={"commit": "x", "dirty": False}, command="test")
    source = ModelSource("synth:x", "synth", "glm4_moe_lite", "affine4/g64")
    line = measured(source, control, both, **base)
    assert line["issue_note"] == both.issue_note and line["issue_ms_per_step"] is None
    both.issue_note = ""  # only stock's failed: the line says whose
    assert measured(source, control, both, **base)["issue_note"] == f"stock: {control.issue_note}"


def test_a_failing_accuracy_rule_keeps_the_tokens_verdict_and_says_why(tiny_q4, monkeypatch):
    from zmlx import accuracy

    monkeypatch.setattr(accuracy, "accuracy", _raising(MemoryError("the float32 reference does not fit")))
    model, tok = tiny_q4
    done = []
    _, r = measure(
        model,
        tok,
        [CONTROL, Variant("router", ("moe_router",))],
        runs=1,
        max_tokens=6,
        prompt_tokens=9,
        accuracy=True,
        count_kernels=False,
        on_done=lambda c, x: done.append(x.variant.name),
    )
    assert r.fidelity["verdict"] == "PASS" and "accuracy" not in r.fidelity
    assert (
        r.fidelity["accuracy_note"]
        == "the accuracy rule failed: MemoryError: the float32 reference does not fit"
    )
    assert done == ["router"]


def test_the_issue_time_and_kernel_count_left_out_say_so_in_the_line(tiny_q4, monkeypatch):
    """--no-issue-time and --no-count-kernels (a 32k prompt's runs need the command's time):
    neither measurement runs, and each figure's note says it was left out."""
    from zmlx.bench import harness

    monkeypatch.setattr(harness, "issue_times", _raising(AssertionError("timed")))
    monkeypatch.setattr(harness, "profile_decode", _raising(AssertionError("counted")))
    model, tok = tiny_q4
    control, r = measure(
        model,
        tok,
        [CONTROL, Variant("router", ("moe_router",))],
        runs=1,
        max_tokens=4,
        prompt_tokens=9,
        count_kernels=False,
        issue_time=False,
    )
    for x in (control, r):
        assert x.issue_ms_per_step is None and x.issue_note == "not timed (--no-issue-time)"
        assert x.kernels_per_token is None and x.kernels_note == "not counted (--no-count-kernels)"
    assert r.fidelity["verdict"] == "PASS"


def _tokens(results):
    return {r.variant.name: r.tokens for r in results}


@pytest.mark.parametrize("spec,prompt_tokens", [("glm", 40), ("synth:gpt_oss/tiny/affine4", 37)])
def test_prefill_once_gives_every_run_the_tokens_of_a_whole_prompt_run(tiny_q4, spec, prompt_tokens):
    """Each run continues a copy of the one prefill's state: its tokens are those of runs that
    prefill the whole prompt, run after run (a run that wrote into the kept state would change
    the next run's), with a static cache (compiled_decode) and past gpt-oss's sliding window
    (RotatingKVCache, 16 positions) too."""
    from zmlx import synth

    model, tok = tiny_q4 if spec == "glm" else synth.build(spec)
    sets = [CONTROL, Variant("compiled", ("compiled_decode",))] if spec == "glm" else [CONTROL]
    kw = dict(runs=2, max_tokens=12, prompt_tokens=prompt_tokens, issue_time=False)
    whole = measure(model, tok, sets, **kw)
    once = measure(model, tok, sets, prefill_once=True, **kw)
    assert _tokens(once) == _tokens(whole)
    for r in once:
        assert len(r.runs) == 2 and len(set(map(tuple, r.tokens))) == 1 and len(r.tokens[0]) == 12
        assert r.runs[0].prompt_tps == r.runs[1].prompt_tps > 0  # the one prefill's
    if spec == "glm":
        assert once[1].compiled_decode["compiled_steps"] > 0  # the static cache's step ran


def test_a_restored_cache_writing_in_place_leaves_the_kept_state():
    """A cache that writes into the very arrays its state was set with (`keys[...] = x`)
    changes a copy: the kept state is what the next run starts from."""
    import mlx.core as mx

    from zmlx.bench.harness import restore

    class InPlace:
        state = None

        def write(self):
            self.state[0][..., 0] = 7.0

    keys = mx.zeros((1, 1, 4, 2))
    kept = [((keys, mx.ones((1, 1, 4, 2)), 4), None)]
    first = restore([InPlace()], kept)[0]
    first.write()
    assert first.state[0][..., 0].tolist() == [[[7.0] * 4]]
    assert not kept[0][0][0].any().item() and kept[0][0][2] == 4
