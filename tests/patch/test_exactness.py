"""The patched tiny GLM-4.7-Flash equals stock bitwise: the checks mlx-lm's model tests make."""

import dataclasses

import mlx.core as mx
import pytest

import zmlx
from zmlx import backend, synth
from zmlx.families import FAMILIES
from zmlx.fidelity import greedy_logits

# patterns that patch one module per MoE layer (all layers but the first, dense one)
_PER_MOE_LAYER = {"moe_router", "moe_combine", "moe_mlp", "downproj_combine"}


def _forward_steps(model, prompt, steps, use_cache):
    """Logits of a prefill then `steps` greedy decode steps (or full recomputes without cache)."""
    if use_cache:
        return greedy_logits(model, prompt, steps)
    outs = []
    seq = prompt
    for _ in range(steps + 1):
        logits = model(seq)
        outs.append(logits)
        seq = mx.concatenate([seq, mx.argmax(logits[:, -1:], axis=-1)], axis=1)
    mx.eval(outs)
    return outs


@pytest.mark.parametrize("which", ["tiny_f32", "tiny_q4"])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(
    "patterns",
    [
        None,
        ("moe_router", "moe_combine", "residual_norm"),
        ("moe_router", "moe_mlp", "downproj_combine", "glm47_rope"),
    ],
)
def test_patched_model_is_bitwise_stock(request, which, use_cache, batch, patterns):
    model, _ = request.getfixturevalue(which)
    prompt = mx.random.randint(1, model.args.vocab_size, (batch, 7), key=mx.random.key(batch))
    stock = _forward_steps(model, prompt, 4, use_cache)
    result = zmlx.patch(model, patterns=patterns)
    try:
        # one module per MoE layer (all but the first) for each MoE pattern, the model loop
        # for residual_norm, every layer's attention for glm47_rope
        chosen = set(patterns or FAMILIES["glm4_moe_lite"].preset_on(backend.current()))
        layers = model.args.num_hidden_layers
        assert result.patched_modules == (
            (layers - 1) * len(chosen & _PER_MOE_LAYER)
            + ("residual_norm" in chosen)
            + layers * ("glm47_rope" in chosen)
        )
        patched = _forward_steps(model, prompt, 4, use_cache)
    finally:
        zmlx.unpatch(model)
    expected_dtype = mx.float32 if which == "tiny_f32" else mx.bfloat16
    for s, p in zip(stock, patched):
        assert s.dtype == p.dtype == expected_dtype
        assert mx.array_equal(s, p).item()


def test_exactness_check_can_fail(tiny_q4, monkeypatch):
    """A combine that is off by one rounding step must be caught by the same comparison."""
    from zmlx.kernels import moe_combine
    from zmlx.patch.patterns import moe_combine as pattern_module

    model, _ = tiny_q4
    prompt = mx.array([[5, 6, 7, 8]])
    stock = _forward_steps(model, prompt, 2, True)
    ref = moe_combine.reference

    def slightly_off(y, scores, shared=None):
        return ref(y, scores * (1 + 2**-10), shared)

    monkeypatch.setattr(pattern_module, "moe_combine", slightly_off)
    zmlx.patch(model)
    try:
        patched = _forward_steps(model, prompt, 2, True)
    finally:
        zmlx.unpatch(model)
    assert not all(mx.array_equal(s, p).item() for s, p in zip(stock, patched))


@pytest.mark.parametrize(
    "patterns",
    [
        ["moe_router"],
        ["moe_combine"],
        ["residual_norm"],
        ["moe_mlp"],
        ["downproj_combine"],
        ["downproj_combine", "moe_mlp"],
        ["swiglu_mlp"],
        ["moe_router", "moe_mlp", "downproj_combine", "swiglu_mlp"],
        ["glm47_rope"],
    ],
)
def test_each_pattern_alone_is_bitwise_stock(tiny_q4, patterns):
    """On the CPU every pattern runs its reference: this checks each replacement's plumbing
    (decode and prompt paths) against stock, bitwise."""
    model, _ = tiny_q4
    prompt = mx.array([[3, 14, 15, 92, 65]])
    stock = _forward_steps(model, prompt, 3, True)
    zmlx.patch(model, patterns=patterns)
    try:
        patched = _forward_steps(model, prompt, 3, True)
    finally:
        zmlx.unpatch(model)
    assert all(mx.array_equal(s, p).item() for s, p in zip(stock, patched))


def test_residual_norm_check_can_fail(tiny_q4, monkeypatch):
    """A residual_norm whose norm weights are off by 2**-6 must be caught."""
    from zmlx.kernels import residual_norm
    from zmlx.patch.patterns import residual_norm as pattern_module

    model, _ = tiny_q4
    prompt = mx.array([[5, 6, 7, 8]])
    stock = _forward_steps(model, prompt, 2, True)
    ref = residual_norm.reference
    monkeypatch.setattr(pattern_module, "residual_norm", lambda x, r, w, eps: ref(x, r, w * (1 + 2**-6), eps))
    zmlx.patch(model, patterns=["residual_norm"])
    try:
        patched = _forward_steps(model, prompt, 2, True)
    finally:
        zmlx.unpatch(model)
    assert not all(mx.array_equal(s, p).item() for s, p in zip(stock, patched))


def test_pipelined_model_is_skipped_with_reason(tiny_q4):
    model, _ = tiny_q4
    model.model.pipeline_size = 2
    try:
        result = zmlx.patch(model, patterns=["residual_norm"])
        assert result.patched_modules == 0
        assert "pipeline-parallel" in result.patterns["residual_norm"].skipped[0][1]
    finally:
        model.model.pipeline_size = 1
        zmlx.unpatch(model)


def test_unquantized_experts_and_mlps_are_patched_and_bitwise_stock(tiny_f32):
    """Unquantized (here float32) experts and dense MLPs take the gemv-order kernels; on the
    CPU their references must equal stock exactly."""
    model, _ = tiny_f32
    prompt = mx.array([[3, 14, 15, 92, 65]])
    stock = _forward_steps(model, prompt, 3, True)
    result = zmlx.patch(model, patterns=["moe_mlp", "downproj_combine", "swiglu_mlp"])
    try:
        moe_layers = model.args.num_hidden_layers - 1
        assert len(result.patterns["moe_mlp"].patched) == moe_layers
        assert len(result.patterns["downproj_combine"].patched) == moe_layers
        assert len(result.patterns["swiglu_mlp"].patched) == model.args.num_hidden_layers
        patched = _forward_steps(model, prompt, 3, True)
    finally:
        zmlx.unpatch(model)
    assert all(mx.array_equal(s, p).item() for s, p in zip(stock, patched))


def test_downproj_combine_wins_over_moe_combine_and_says_so(tiny_q4):
    model, _ = tiny_q4
    result = zmlx.patch(model, patterns=["moe_combine", "downproj_combine"])
    try:
        assert len(result.patterns["downproj_combine"].patched) == model.args.num_hidden_layers - 1
        assert result.patterns["moe_combine"].patched == []
        assert "already replaced by downproj_combine" in result.patterns["moe_combine"].skipped[0][1]
    finally:
        zmlx.unpatch(model)


def test_swiglu_mlp_patches_every_dense_mlp(tiny_q4):
    model, _ = tiny_q4
    result = zmlx.patch(model, patterns=["swiglu_mlp"])
    try:  # the first, dense layer and every MoE layer's shared expert
        assert len(result.patterns["swiglu_mlp"].patched) == model.args.num_hidden_layers
    finally:
        zmlx.unpatch(model)


@pytest.mark.parametrize("patterns", [["moe_combine"], ["downproj_combine", "moe_mlp", "swiglu_mlp"]])
def test_shared_expert_overlap_is_bitwise_stock_and_uses_a_second_stream(tiny_q4, patterns):
    from zmlx.config import PatchConfig
    from zmlx.patch import moe

    model, _ = tiny_q4
    prompt = mx.array([[3, 14, 15, 92, 65]])
    stock = _forward_steps(model, prompt, 3, True)
    moe._SIDE_STREAMS.clear()
    overlap = PatchConfig.from_env({"ZMLX_MOE_SHARED_EXPERTS_OVERLAP": "1"})
    zmlx.patch(model, patterns=patterns, config=overlap)
    try:
        patched = _forward_steps(model, prompt, 3, True)
    finally:
        zmlx.unpatch(model)
    assert all(mx.array_equal(s, p).item() for s, p in zip(stock, patched))
    assert len(moe._SIDE_STREAMS) == 1  # the shared experts ran on the side stream


def test_expert_and_dense_kernels_skip_mxfp4_with_the_reason():
    model, _ = synth.build("synth:glm4_moe_lite/tiny/mxfp4")
    result = zmlx.patch(model, patterns=["moe_mlp", "downproj_combine", "swiglu_mlp"])
    try:
        for name in ("moe_mlp", "downproj_combine", "swiglu_mlp"):
            report = result.patterns[name]
            assert report.patched == [] and report.skipped, name
            assert all("mxfp4-quantized (affine only)" in why for _, why in report.skipped), report.skipped
    finally:
        zmlx.unpatch(model)


@pytest.mark.parametrize("which", ["tiny_q4", "tiny_f32"])
def test_expert_patterns_leave_sorted_decode_steps_to_mlx_lm(request, which, monkeypatch):
    """16 sequences x top-4 = 64 rows: mlx-lm sorts them by expert, so the expert patterns
    must hand such a decode step to mlx-lm's own path (bitwise stock)."""
    from zmlx.patch.patterns import downproj_combine, moe_mlp

    model, _ = request.getfixturevalue(which)
    calls = []
    for module, name in ((moe_mlp, "moe_mlp"), (downproj_combine, "downproj_combine")):
        kernel = getattr(module, name)

        def spy(*a, _k=kernel, **kw):
            calls.append(a[0].shape)
            return _k(*a, **kw)

        # the spy is the kernel's reference: what its prepared launch runs on the CPU, every call
        monkeypatch.setattr(module, name, dataclasses.replace(kernel, reference=spy))
    for batch, expect_calls in ((16, False), (1, True)):
        prompt = mx.array([[3, 14, 15, 92, 65]] * batch) + mx.arange(batch)[:, None]
        stock = _forward_steps(model, prompt, 2, True)
        zmlx.patch(model, patterns=["moe_mlp", "downproj_combine", "swiglu_mlp"])
        calls.clear()
        try:
            patched = _forward_steps(model, prompt, 2, True)
        finally:
            zmlx.unpatch(model)
        assert all(mx.array_equal(s, p).item() for s, p in zip(stock, patched))
        assert bool(calls) == expect_calls, (batch, calls)


@pytest.mark.parametrize(
    "patterns,kernel_activations", [(["downproj_combine"], False), (["moe_mlp", "downproj_combine"], True)]
)
def test_downproj_combine_takes_the_activations_from_moe_mlp_only_when_it_is_chosen(
    tiny_q4, monkeypatch, patterns, kernel_activations
):
    """With moe_mlp chosen too, the block's activations come from the moe_mlp kernel (as the
    patched SwitchGLU computes them); alone, from mlx-lm's own projections."""
    from zmlx.patch.patterns import downproj_combine

    model, _ = tiny_q4
    calls = []
    kernel = downproj_combine.moe_mlp

    def spy(*a, **kw):
        calls.append(1)
        return kernel(*a, **kw)

    # the spy is the kernel's reference: what its prepared launch runs on the CPU, every call
    monkeypatch.setattr(downproj_combine, "moe_mlp", dataclasses.replace(kernel, reference=spy))
    zmlx.patch(model, patterns=patterns)
    try:
        _forward_steps(model, mx.array([[3, 14, 15, 92, 65]]), 2, True)
    finally:
        zmlx.unpatch(model)
    assert bool(calls) == kernel_activations
