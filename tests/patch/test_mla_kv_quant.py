"""mla_kv_quant: MLA attention over mlx-lm's quantized KV cache (kv_bits), on the CPU.

The attention with a quantized cache equals mlx-lm's own attention module run on the
dequantized cache contents (bitwise); with any other cache the patched model is bitwise
stock; mlx-lm's generate with kv_bits runs (stock fails); the 8-bit cache passes the accuracy
rule against the bf16 cache; prompt-cache files and trim keep working; the cache's bytes."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import generate
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

import zmlx
from zmlx.accuracy import RULE, Divergences, log_probs, reference_model
from zmlx.latent_quant import cache_bytes, kv_quant_error

PATTERNS = "moe_router,moe_combine,mla_kv_quant"
PROMPT = "the quantized latent cache holds every position"


class DequantizedCache:
    """mlx-lm's QuantizedKVCache that hands back its contents dequantized (and has no `bits`,
    so mlx-lm's attention takes them as plain keys and values)."""

    def __init__(self, group_size: int, bits: int):
        self.q = QuantizedKVCache(group_size=group_size, bits=bits)

    @property
    def offset(self) -> int:
        return self.q.offset

    def update_and_fetch(self, keys, values):
        k, v = self.q.update_and_fetch(keys, values)
        g, b = self.q.group_size, self.q.bits
        return mx.dequantize(*k, group_size=g, bits=b), mx.dequantize(*v, group_size=g, bits=b)


def _attention(model):
    return model.layers[0].self_attn


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 32), (8, 64), (8, 32)])
@pytest.mark.parametrize("which", ["tiny_q4", "tiny_f32"])
def test_attention_reads_the_quantized_cache_as_mlx_lm_reads_its_dequantized_contents(
    which, bits, group_size, request
):
    model = request.getfixturevalue(which)[0]
    attn = _attention(model)
    stock_call = type(attn).__call__  # mlx-lm's method (the model is not patched here)
    zmlx.patch(model, patterns="mla_kv_quant")
    try:
        assert type(attn).__call__ is not stock_call
        ours, theirs = QuantizedKVCache(group_size=group_size, bits=bits), DequantizedCache(group_size, bits)
        dim, dtype = model.args.hidden_size, attn.kv_a_layernorm.weight.dtype
        # a prompt into the empty cache, decode steps, then a prompt chunk into the filled cache
        for step, L in enumerate((7, 1, 1, 3, 1)):
            x = mx.random.normal((1, L, dim), key=mx.random.key(step)).astype(dtype)
            mask = create_causal_mask(L, ours.offset) if L > 1 else None
            a = attn(x, mask, ours)
            b = stock_call(attn, x, mask, theirs)
            assert a.dtype == b.dtype == dtype and mx.isfinite(a).all().item()
            assert mx.array_equal(a, b).item(), (step, L)
        assert ours.offset == theirs.offset == 13
    finally:
        zmlx.unpatch(model)


def test_other_caches_are_bitwise_stock(tiny_q4, decode_steps):
    model = tiny_q4[0]
    prompt = mx.random.randint(1, 512, (2, 7), key=mx.random.key(3))
    stock = decode_steps(model, prompt, 4)
    stock_no_cache = model(prompt)
    result = zmlx.patch(model, patterns="mla_kv_quant")
    try:
        assert len(result.patterns["mla_kv_quant"].patched) == model.args.num_hidden_layers
        patched = decode_steps(model, prompt, 4)
        patched_no_cache = model(prompt)
    finally:
        zmlx.unpatch(model)
    for s, p in zip(stock + [stock_no_cache], patched + [patched_no_cache], strict=True):
        assert mx.array_equal(s, p).item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("start,prefill", [(0, 4), (6, 2048)], ids=["prompt-quantized", "after-start"])
def test_mlx_lm_generate_runs_with_kv_bits(tiny_q4, bits, start, prefill, capsys):
    """start 0 with 4-token prefill chunks: the later chunks of the prompt go into the
    quantized cache (several tokens at once); start 6: the cache is quantized after the prompt."""
    model, tok = tiny_q4
    kw = dict(max_tokens=8, kv_bits=bits, quantized_kv_start=start, prefill_step_size=prefill)
    with pytest.raises(AttributeError, match="swapaxes"):  # mlx-lm's own attention
        generate(model, tok, PROMPT, **kw)
    zmlx.patch(model, patterns=PATTERNS)
    try:
        text = generate(model, tok, PROMPT, **kw)
        again = generate(model, tok, PROMPT, **kw)
    finally:
        zmlx.unpatch(model)
    assert text and text == again  # greedy
    with capsys.disabled():
        print(f"\nkv_bits={bits} quantized_kv_start={start} prefill_step_size={prefill}: {text!r}")


def _teacher_forced(model, prompt, tokens, bits, group_size=64):
    """Log-probs after the prompt and after each token, the cache quantized from the start
    (as mlx-lm's generate does it with quantized_kv_start 0) when bits is not None."""
    cache = make_prompt_cache(model)
    logits = model(prompt[None], cache=cache)[0, -1]
    outs = []
    for t in tokens:
        maybe_quantize_kv_cache(cache, 0, group_size, bits)
        outs.append(logits.astype(mx.float32))
        mx.eval(outs[-1])
        logits = model(mx.array([[t]]), cache=cache)[0, -1]
    return log_probs(outs)


def test_8_bit_cache_passes_the_accuracy_rule_against_the_bf16_cache(tiny_q4):
    """Against the float32 model, the 8-bit latent cache is no further than the bf16 cache (the
    accuracy rule); the 4-bit one is further than the 8-bit one."""
    model = tiny_q4[0]
    ref = reference_model(model)
    prompt = mx.random.randint(1, 4000, (8,), key=mx.random.key(1))
    tokens = mx.random.randint(1, 4000, (64,), key=mx.random.key(2)).tolist()
    zmlx.patch(model, patterns=PATTERNS)
    try:
        truth = _teacher_forced(ref, prompt, tokens, None)
        bf16 = Divergences.between(truth, _teacher_forced(model, prompt, tokens, None))
        q8 = Divergences.between(truth, _teacher_forced(model, prompt, tokens, 8))
        q4 = Divergences.between(truth, _teacher_forced(model, prompt, tokens, 4))
    finally:
        zmlx.unpatch(model)
    accurate, why = RULE.judge(bf16, q8)
    assert accurate, why
    assert q4.kld_mean > q8.kld_mean


def _quantized_prompt_cache(model, tokens, bits=8):
    cache = make_prompt_cache(model)
    model(tokens[None], cache=cache)
    maybe_quantize_kv_cache(cache, 0, 64, bits)
    return cache


def _decode(model, cache, tokens):
    outs = [model(mx.array([[t]]), cache=cache) for t in tokens]
    mx.eval(outs)
    return outs


def test_prompt_cache_file_round_trips_the_quantized_latent(tiny_q4, tmp_path):
    model = tiny_q4[0]
    prompt = mx.random.randint(1, 4000, (9,), key=mx.random.key(4))
    nxt = [5, 17, 33]
    zmlx.patch(model, patterns=PATTERNS)
    try:
        cache = _quantized_prompt_cache(model, prompt)
        mx.eval([c.state for c in cache])
        path = str(tmp_path / "latent.safetensors")
        save_prompt_cache(path, cache)
        loaded = load_prompt_cache(path)
        assert {(type(c), c.offset, c.bits, c.group_size) for c in loaded} == {(QuantizedKVCache, 9, 8, 64)}
        direct, from_file = _decode(model, cache, nxt), _decode(model, loaded, nxt)
    finally:
        zmlx.unpatch(model)
    for a, b in zip(direct, from_file, strict=True):
        assert mx.array_equal(a, b).item()


def test_trim_of_a_quantized_latent_cache_replays_the_same_logits(tiny_q4):
    model = tiny_q4[0]
    prompt = mx.random.randint(1, 4000, (9,), key=mx.random.key(5))
    nxt = [5, 17, 33]
    zmlx.patch(model, patterns=PATTERNS)
    try:
        cache = _quantized_prompt_cache(model, prompt, bits=4)
        first = _decode(model, cache, nxt)
        assert trim_prompt_cache(cache, len(nxt)) == len(nxt)
        assert all(c.offset == 9 for c in cache)
        again = _decode(model, cache, nxt)
    finally:
        zmlx.unpatch(model)
    for a, b in zip(first, again, strict=True):
        assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("bits,group_size,ratio", [(8, 64, 0.53125), (4, 64, 0.28125), (4, 32, 0.3125)])
def test_cache_bytes_of_the_quantized_latent(tiny_q4, bits, group_size, ratio):
    """Per position and layer: the bf16 cache holds (kv_lora_rank + rope) * 2 bytes; the
    quantized one bits / 8 bytes per value plus a bf16 scale and bias per group."""
    model = tiny_q4[0]
    prompt = mx.random.randint(1, 4000, (40,), key=mx.random.key(6))
    zmlx.patch(model, patterns=PATTERNS)
    try:
        bf16 = make_prompt_cache(model)
        model(prompt[None], cache=bf16)
        quantized = make_prompt_cache(model)
        model(prompt[None], cache=quantized)
        maybe_quantize_kv_cache(quantized, 0, group_size, bits)
    finally:
        zmlx.unpatch(model)
    attn = _attention(model)
    dims = attn.kv_lora_rank + attn.qk_rope_head_dim
    layers = model.args.num_hidden_layers
    assert all(type(c) is KVCache for c in bf16)
    assert cache_bytes(bf16) == layers * 40 * dims * 2
    assert cache_bytes(quantized) == layers * 40 * (dims * bits // 8 + 2 * (dims // group_size) * 2)
    assert cache_bytes(quantized) / cache_bytes(bf16) == ratio


def test_unsupported_bits_and_groups_are_named():
    assert kv_quant_error(4, 64) is None and kv_quant_error(8, 32) is None
    assert "--kv-bits 3 is not supported" in kv_quant_error(3, 64)
    assert "--kv-group-size 128 is not supported" in kv_quant_error(8, 128)


def test_unsupported_bits_in_the_cache_raise_one_clear_error(tiny_q4):
    model = tiny_q4[0]
    zmlx.patch(model, patterns=PATTERNS)
    try:
        with pytest.raises(ValueError, match="--kv-bits 3 is not supported for an MLA latent cache"):
            model(mx.array([[1, 2, 3]]), cache=[QuantizedKVCache(64, 3) for _ in model.layers])
    finally:
        zmlx.unpatch(model)


def test_dsa_attention_is_skipped_with_the_reason():
    from zmlx import synth

    model = synth.build("synth:deepseek_v32/tiny/bf16")[0]
    result = zmlx.patch(model, patterns="mla_kv_quant")
    report = result.patterns["mla_kv_quant"]
    assert not report.patched
    assert {why for _, why in report.skipped} == {
        "DSA indexer: the layer's cache is a CacheList, which mlx-lm does not quantize"
    }


@pytest.mark.parametrize("family", ["deepseek_v3", "kimi_k25"])
def test_deepseek_attention_reads_the_quantized_cache_and_is_stock_otherwise(family):
    """DeepSeek-V3's MLA attention (Kimi's too) is glm4_moe_lite's code: the same two checks."""
    from test_family_exactness import build, forward

    model = build(family)
    prompt = mx.random.randint(1, 512, (1, 7), key=mx.random.key(7))
    stock = forward(model, prompt, 3, True)
    cache = [QuantizedKVCache(64, 8) for _ in model.layers]
    with pytest.raises(AttributeError, match="swapaxes"):
        model(prompt, cache=cache)
    result = zmlx.patch(model, patterns="mla_kv_quant")
    try:
        assert len(result.patterns["mla_kv_quant"].patched) == len(model.layers)
        patched = forward(model, prompt, 3, True)
        attn = model.layers[0].self_attn
        ours, theirs = QuantizedKVCache(64, 8), DequantizedCache(64, 8)
        for step, L in enumerate((5, 1, 2)):
            x = mx.random.normal((1, L, attn.hidden_size), key=mx.random.key(step)).astype(mx.bfloat16)
            mask = create_causal_mask(L, ours.offset) if L > 1 else None
            a = attn(x, mask, ours)
            assert mx.array_equal(a, type(attn).__zmlx_original__.__call__(attn, x, mask, theirs)).item()
    finally:
        zmlx.unpatch(model)
    for s, p in zip(stock, patched, strict=True):
        assert mx.array_equal(s, p).item()


def test_the_block_patterns_hand_a_quantized_cache_to_the_attention(tiny_q4, blocks_on_the_cpu):
    """mla_block and moe_block run their launches with mlx-lm's KVCache only: a quantized cache
    goes to the layer's attention (as patched), so mla_kv_quant composes with them."""
    model, tok = tiny_q4
    kw = dict(max_tokens=6, kv_bits=8, quantized_kv_start=0)
    zmlx.patch(model, patterns=PATTERNS)
    try:
        alone = generate(model, tok, PROMPT, **kw)
    finally:
        zmlx.unpatch(model)
    result = zmlx.patch(model, patterns=PATTERNS + ",mla_block,moe_block")
    try:
        assert all(result.patterns[n].patched for n in ("mla_kv_quant", "mla_block", "moe_block"))
        with_blocks = generate(model, tok, PROMPT, **kw)
    finally:
        zmlx.unpatch(model)
    assert with_blocks == alone, (with_blocks, alone)


@pytest.mark.parametrize("first", ["glm47_rope", "mla_attention", "glm47_rope,mla_kv_quant"])
def test_attention_patterns_that_take_the_call_first_hand_a_quantized_cache_on(tiny_q4, first):
    """glm47_rope and mla_attention take the attention's __call__ before mla_kv_quant (their
    kernels read a plain cache): over mlx-lm's quantized cache they run mla_kv_quant's path,
    so a preset with them (the CUDA default has glm47_rope) works with kv_bits."""
    model, tok = tiny_q4
    assert _text_8_bit(model, tok, first) == _text_8_bit(model, tok, PATTERNS)


def _text_8_bit(model, tok, patterns: str) -> str:
    """Greedy text of the model patched with `patterns` over an 8-bit latent cache."""
    zmlx.patch(model, patterns=patterns)
    try:
        return generate(model, tok, PROMPT, max_tokens=6, kv_bits=8, quantized_kv_start=0)
    finally:
        zmlx.unpatch(model)
