"""mla_block on the DeepSeek-V3 family's YaRN models (mlx-lm's YarnRoPE: DeepSeek-V3, Kimi-K2):
mla_q_prep ropes q_pe and k_pe with the table of YaRN's frequencies and its input mscale, and
scales q_pe by the module's YaRN-adjusted scale. The eager decode steps against stock are
tests/patch/test_family_exactness.py's (`test_close_attention_patterns_decode_close_to_stock`);
here the compiled step (a device position: the table row gathered in the graph, mlx-lm's rope
given the array on the CPU), a rope mla_q_prep cannot follow, and the GPU."""

import mlx.core as mx
import pytest
from mlx_lm.models.rope_utils import Llama3RoPE, YarnRoPE
from test_family_exactness import YARN, build  # the test directory is on sys.path (pytest)
from test_mla_block import LAUNCHES, ON_THE_CPU, PROMPT, _close, _greedy_tokens, _steps

import zmlx
from zmlx import synth
from zmlx.fidelity import greedy_logits
from zmlx.patch.patterns import compiled_decode, mla_block

pytestmark = pytest.mark.usefixtures("blocks_on_the_cpu")


def _layers(model, family):
    return model.language_model.model.layers if family == "kimi_k25" else model.model.layers


def _run(model, family, prompt, steps, patterns):
    """(logits, compiled_decode's stats, each layer's mla_block decode plan)."""
    result = zmlx.patch(model, patterns=patterns)
    try:
        assert len(result.patterns["mla_block"].patched) == len(_layers(model, family))
        logits = greedy_logits(model, prompt, steps)
        plans = [mla_block.decode_plan(layer) for layer in _layers(model, family)]
        return logits, compiled_decode.stats(model), plans
    finally:
        zmlx.unpatch(model)


@pytest.mark.parametrize("family", sorted(YARN))
def test_compiled_steps_on_a_yarn_model_are_eager_mla_block(no_stock_attention, family):
    """Inside compiled_decode's traced step the position is a device array: every decode step
    runs the launches (their references here) and gives eager mla_block's logits bitwise."""
    model = build(family, "float32", yarn=True)
    assert type(_layers(model, family)[0].self_attn.rope) is YarnRoPE
    prompt = mx.random.randint(1, 512, (2, 7), key=mx.random.key(4))
    eager, _, plans = _run(model, family, prompt, 5, "mla_block")
    ours, stats, _ = _run(model, family, prompt, 5, "mla_block,compiled_decode")
    assert all(set(p.values()) == {ON_THE_CPU} for p in plans), plans
    assert stats["compiled_steps"] == 5 and stats["stock_steps"] == {}, stats
    for a, b in zip(eager, ours, strict=True):
        assert a.dtype == b.dtype and mx.array_equal(a, b).item()


def test_a_rope_mla_q_prep_cannot_follow_is_skipped_with_its_reason(fresh_q4):
    """rope_scaling other than YaRN (here llama3's): mla_block leaves that layer to mlx-lm."""
    attn = fresh_q4.model.layers[1].self_attn
    attn.rope = Llama3RoPE(attn.qk_rope_head_dim, traditional=True, scaling_config={"factor": 8.0})
    result = zmlx.patch(fresh_q4, patterns=["mla_block"])
    zmlx.unpatch(fresh_q4)
    report = result.patterns["mla_block"]
    assert [p for p, _ in report.skipped] == ["model.layers.1"]
    assert "rope is Llama3RoPE, not nn.RoPE or YarnRoPE" in report.skipped[0][1]
    assert len(report.patched) == fresh_q4.args.num_hidden_layers - 1


# ---------------------------------------------------------------- on the GPU (the lead runs these)


@pytest.mark.cuda
@pytest.mark.parametrize("family", sorted(YARN))
@pytest.mark.parametrize("spec", [None, "tiny/affine4"])
def test_on_the_gpu_a_yarn_model_runs_the_kernels_close_to_stock(family, spec):
    """The family's YaRN model (this directory's, whose Kimi rope scales its input; or the
    synth checkpoint's, DeepSeek-V3's rope_scaling): each layer's decode steps run the fused
    kernels, eagerly and inside compiled_decode's step, and stay within mla_block's
    tolerance of stock."""
    mx.set_default_device(mx.gpu)  # blocks_on_the_cpu puts the CPU back afterwards
    if spec is None:
        model = build(family, yarn=True, cuda_widths=True)  # widths stock serves on CUDA
    else:
        model = synth.build(f"synth:{family}/{spec}")[0]
    assert type(_layers(model, family)[0].self_attn.rope) is YarnRoPE
    stock = greedy_logits(model, PROMPT, 6)
    for patterns in (["mla_block"], ["mla_block", "compiled_decode"]):
        mla_block._BLOCKS.clear()
        result = zmlx.patch(model, patterns=patterns)
        try:
            patched = _steps(model, PROMPT, _greedy_tokens(stock))
            plans = [mla_block.decode_plan(layer) for layer in _layers(model, family)]
            stats = compiled_decode.stats(model)
        finally:
            zmlx.unpatch(model)
        assert result.patterns["mla_block"].path == "kernel", result.patterns["mla_block"].fallbacks
        if "compiled_decode" in patterns:
            assert stats["compiled_steps"] == 6 and stats["stock_steps"] == {}, stats
        assert all(set(p.values()) == {f"kernel: {LAUNCHES}"} for p in plans), plans
        _close(stock, patched)
