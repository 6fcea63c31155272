"""zmlx.prefill: a prompt fed as mlx-lm's generate feeds it, never more than a chunk a call
(a whole 32k prompt in one call ran an H200 out of memory), and every measurement that
prefills goes through it."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from zmlx.prefill import PREFILL_STEP, prefill

PROMPT = mx.array([(11 * i + 5) % 400 + 1 for i in range(23)])


class Recording:
    """The model, with the length of each call's input recorded."""

    def __init__(self, model):
        self.model, self.lengths = model, []
        self.layers = model.layers

    def make_cache(self):
        return make_prompt_cache(self.model)

    def __call__(self, x, cache=None):
        self.lengths.append(x.shape[1])
        return self.model(x, cache=cache)


@pytest.mark.parametrize("chunk", [1, 5, 22, 23, PREFILL_STEP])
def test_no_call_is_longer_than_a_chunk_and_the_last_token_comes_alone(tiny_f32, chunk):
    rec = Recording(tiny_f32[0])
    cache, logits = prefill(rec, PROMPT, chunk=chunk)
    n = PROMPT.size
    full, rest = divmod(n - 1, chunk)
    assert rec.lengths == [chunk] * full + ([rest] if rest else []) + [1]
    assert cache[0].offset == n
    assert logits.shape == (1, 1, tiny_f32[0].args.vocab_size)


def test_the_logits_are_the_whole_prompts_up_to_rounding(tiny_f32):
    """Chunks change the GEMMs' shapes, not the arithmetic: float32 on the CPU agrees closely
    with one call over the whole prompt, and the cache holds every position."""
    model = tiny_f32[0]
    whole_cache = make_prompt_cache(model)
    whole = model(PROMPT[None], cache=whole_cache)[:, -1:]
    cache, logits = prefill(model, PROMPT, chunk=4)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(whole), rtol=1e-4, atol=1e-4)
    assert [c.offset for c in cache] == [c.offset for c in whole_cache]


def test_mlx_lm_generate_feeds_the_same_chunks(tiny_f32, monkeypatch):
    """The chunking is mlx-lm's own: generate_step with the same step size makes the same calls."""
    from mlx_lm.generate import generate_step

    rec = Recording(tiny_f32[0])
    steps = generate_step(PROMPT, rec, max_tokens=1, prefill_step_size=5)
    next(steps)
    mine = Recording(tiny_f32[0])
    prefill(mine, PROMPT, chunk=5)
    assert rec.lengths[: len(mine.lengths)] == mine.lengths


@pytest.mark.parametrize(
    "prompt, chunk, match",
    [(PROMPT, 0, "chunk"), (PROMPT[None], 4, "1-D"), (mx.array([], dtype=mx.int32), 4, "non-empty")],
)
def test_bad_arguments_say_which(tiny_f32, prompt, chunk, match):
    with pytest.raises(ValueError, match=match):
        prefill(tiny_f32[0], prompt, chunk=chunk)


def test_the_measurements_feed_a_long_prompt_in_chunks(tiny_f32):
    """The host-time steps, teacher-forced accuracy and the quantized-cache benchmark prefill
    through it: with a prompt longer than mlx-lm's step, no call takes more than the step."""
    from zmlx import fidelity
    from zmlx.bench import issue_time, kv_quant

    long = mx.array([(13 * i + 7) % 400 + 1 for i in range(PREFILL_STEP + 9)])
    runs = {
        "issue_times": lambda m: issue_time.issue_times(m, long, steps=1, warm=0),
        "teacher_forced_logits": lambda m: list(fidelity.teacher_forced_logits(m, long, [5, 6])),
        "kv_quant.prefill": lambda m: kv_quant.prefill(m, long, PREFILL_STEP),
    }
    for name, run in runs.items():
        rec = Recording(tiny_f32[0])
        run(rec)
        assert rec.lengths[:2] == [PREFILL_STEP, 8], name
        assert max(rec.lengths[2:]) == 1, name


def test_kv_bits_quantize_the_cache_before_the_last_token(tiny_q4):
    """As mlx-lm's --kv-bits: the cache is a QuantizedKVCache when the last token goes in (so
    the model must read one: mla_kv_quant on an MLA model), holding every position."""
    import zmlx

    model = tiny_q4[0]
    zmlx.patch(model, patterns=["mla_kv_quant"])
    try:
        cache, logits = prefill(model, PROMPT, chunk=8, kv_bits=8)
    finally:
        zmlx.unpatch(model)
    assert all(type(c).__name__ == "QuantizedKVCache" and c.bits == 8 and c.group_size == 64 for c in cache)
    assert all(c.offset == PROMPT.size for c in cache)
    assert mx.isfinite(logits).all().item()
