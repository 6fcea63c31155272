"""StaticMLACache against mlx-lm's KVCache on the tiny GLM-4.7-Flash: the same logits, bitwise,
for prompts, decode, trim, save/load of a prompt cache and mlx-lm's generate APIs (eager use);
the traced mode's writes and masks; the capacity buckets' memory bound."""

import mlx.core as mx
import pytest
from mlx_lm import generate, stream_generate
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import (
    BatchKVCache,
    KVCache,
    load_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from zmlx.static_cache import StaticMLACache, bucket


def _caches(model, kind):
    n = len(model.layers)
    return [KVCache() for _ in range(n)] if kind == "kv" else [StaticMLACache() for _ in range(n)]


def _decode(model, caches, tokens, steps):
    """Logits of `tokens` (B, L) into `caches`, then of `steps` greedy steps, evaluated."""
    outs = [model(tokens, cache=caches)]
    for _ in range(steps):
        outs.append(model(mx.argmax(outs[-1][:, -1:], axis=-1), cache=caches))
    mx.eval(outs)
    return outs


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert mx.array_equal(x, y).item()


def test_bucket_is_the_next_power_of_two_at_least_the_minimum():
    assert [bucket(n, 256) for n in (0, 1, 255, 256, 257, 512, 513, 4096, 4097)] == [
        256, 256, 256, 256, 512, 512, 1024, 4096, 8192,
    ]  # fmt: skip
    assert bucket(5, 1) == 8 and bucket(1, 1) == 1


# each model and each batch size once: the cache's growth does not depend on the weights'
# packing, and the quantized model's 250-token prompts are the slow part on the CPU
@pytest.mark.parametrize("which,batch", [("tiny_q4", 1), ("tiny_f32", 1), ("tiny_f32", 2)])
def test_eager_logits_are_bitwise_kv_cache_across_a_bucket_boundary(request, which, batch):
    model, _ = request.getfixturevalue(which)
    # a 250-token prompt and 10 steps: the buffers grow from 256 to 512 positions mid-decode
    prompt = mx.random.randint(1, model.args.vocab_size, (batch, 250), key=mx.random.key(batch))
    stock = _decode(model, kv := _caches(model, "kv"), prompt, 10)
    static = _decode(model, st := _caches(model, "static"), prompt, 10)
    _same(stock, static)
    assert st[0].capacity == 512 and st[0].offset == kv[0].offset == 260
    assert st[0].keys.shape[:2] == (batch, 1)


def test_trim_then_decode_is_bitwise_kv_cache(tiny_q4):
    model, _ = tiny_q4
    prompt = mx.array([[5, 9, 100, 7, 33, 61, 2, 8]])
    runs = []
    for kind in ("kv", "static"):
        caches = _caches(model, kind)
        first = _decode(model, caches, prompt, 4)
        assert trim_prompt_cache(caches, 6) == 6
        assert caches[0].size() == 6
        runs.append(first + _decode(model, caches, mx.array([[11, 12, 13]]), 4))
    _same(*runs)


def test_prompt_cache_file_round_trips_and_decodes_like_kv_cache(tiny_q4, tmp_path):
    model, _ = tiny_q4
    prompt = mx.array([[5, 9, 100, 7, 33, 61, 2, 8, 4, 4, 90]])
    kv, st = _caches(model, "kv"), _caches(model, "static")
    _decode(model, kv, prompt, 3)
    _decode(model, st, prompt, 3)
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, st, {"note": "static"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"note": "static"}
    assert all(type(c) is StaticMLACache for c in loaded)
    assert [(c.offset, c.capacity, c.keys.dtype) for c in loaded] == [
        (c.offset, c.capacity, c.keys.dtype) for c in st
    ]
    for a, b in zip(loaded, st):
        assert mx.array_equal(a.keys, b.keys).item() and mx.array_equal(a.values, b.values).item()
    nxt = mx.array([[17]])
    _same(_decode(model, kv, nxt, 4), _decode(model, loaded, nxt, 4))


@pytest.mark.parametrize("api", ["generate", "stream_generate"])
def test_mlx_lm_generate_with_a_static_prompt_cache_gives_the_same_text(tiny_q4, api):
    model, tok = tiny_q4
    prompt = "the static cache holds the latent positions of every layer"

    def run(kind):
        caches = _caches(model, kind)
        if api == "generate":
            return generate(model, tok, prompt, max_tokens=24, prompt_cache=caches), caches
        toks = [r.token for r in stream_generate(model, tok, prompt, max_tokens=24, prompt_cache=caches)]
        return toks, caches

    (stock, kv), (static, st) = run("kv"), run("static")
    assert stock == static and len(stock) > 0
    assert st[0].offset == kv[0].offset > 24


def test_memory_a_bucket_at_most_doubles_the_cache():
    """The buffers hold at most twice the positions KVCache allocates for the same tokens, and
    at most twice the valid positions once past the minimum bucket."""
    lat, pe = mx.zeros((1, 1, 1, 16), mx.bfloat16), mx.zeros((1, 1, 1, 4), mx.bfloat16)
    for n in (1, 7, 255, 256, 257, 300, 511, 513, 1025, 2049, 4100):
        kv, st = KVCache(), StaticMLACache()
        prompt = (mx.zeros((1, 1, n, 16), mx.bfloat16), mx.zeros((1, 1, n, 4), mx.bfloat16))
        kv.update_and_fetch(*prompt)
        st.update_and_fetch(*prompt)
        for _ in range(3):  # a few decode steps: growth by copying into the next bucket
            kv.update_and_fetch(lat, pe)
            st.update_and_fetch(lat, pe)
        used = n + 3
        assert st.capacity == bucket(used, StaticMLACache.min_capacity)
        assert st.nbytes <= 2 * kv.nbytes, n
        assert st.capacity <= 2 * max(used, StaticMLACache.min_capacity), n
        assert st.nbytes == st.capacity * (16 + 4) * 2


def _traced(cache, position):
    cache.trace_at(cache.keys, cache.values, mx.array(position, mx.int32))


def test_traced_mode_writes_at_the_device_position_and_returns_the_whole_buffers():
    c = StaticMLACache(min_capacity=8)
    c.update_and_fetch(mx.ones((1, 1, 3, 2)), mx.ones((1, 1, 3, 1)))
    _traced(c, 3)
    k, v = c.update_and_fetch(mx.full((1, 1, 1, 2), 7.0), mx.full((1, 1, 1, 1), 5.0))
    assert k.shape == (1, 1, 8, 2) and v.shape == (1, 1, 8, 1)
    assert k[0, 0, :, 0].tolist() == [1, 1, 1, 7, 0, 0, 0, 0]
    assert v[0, 0, :, 0].tolist() == [1, 1, 1, 5, 0, 0, 0, 0]
    assert isinstance(c.offset, mx.array) and c.offset.item() == 3  # RoPE's offset while traced
    with pytest.raises(RuntimeError, match="traced"):
        c.trim(1)
    c.end_trace()
    assert c.offset == 3  # the int mirror; the step that wrote advances it
    c.advance(1, mx.array(4, mx.int32))
    assert c.offset == 4 and c.position.item() == 4


@pytest.mark.parametrize("n", [1, 3])
def test_a_traced_write_is_one_scatter_per_buffer_with_the_eager_writes_values(n):
    """The traced write is a scatter along the positions (one kernel on CUDA), not a slice
    update at a device start (an offset kernel, then the copy); it writes what the eager
    path writes, batch 2 and several rows included."""
    import io
    import re

    lat, pe = mx.random.normal((2, 1, n, 4)), mx.random.normal((2, 1, n, 3))
    eager, traced = StaticMLACache(min_capacity=8), StaticMLACache(min_capacity=8)
    for c in (eager, traced):
        c.update_and_fetch(mx.ones((2, 1, 2, 4)), mx.ones((2, 1, 2, 3)))
    eager.update_and_fetch(lat, pe)
    _traced(traced, 2)
    mx.eval(lat, pe, traced.keys, traced.values, traced._traced)  # only the write left unevaluated
    k, v = traced.update_and_fetch(lat, pe)
    dot = io.StringIO()
    mx.export_to_dot(dot, k, v)  # the graph, before evaluating it
    ops = re.findall(r'label ="([A-Za-z]+)"', dot.getvalue())
    assert ops.count("ScatterAxis") == 2 and "DynamicSliceUpdate" not in ops, ops
    assert mx.array_equal(k, eager.keys).item() and mx.array_equal(v, eager.values).item()


@pytest.mark.parametrize("n", [1, 3])
def test_traced_mask_is_the_causal_mask_over_the_valid_positions(n):
    c = StaticMLACache(min_capacity=16)
    c.update_and_fetch(mx.zeros((1, 1, 5, 2)), mx.zeros((1, 1, 5, 1)))
    eager = create_causal_mask(n, 5)  # (n, 5 + n): what KVCache's mask covers
    _traced(c, 5)
    mask = c.make_mask(n, return_array=True)
    assert mask.shape == (n, 16) and mask.dtype == mx.bool_
    assert mx.array_equal(mask[:, : 5 + n], eager).item()
    assert not mask[:, 5 + n :].any().item()
    c.end_trace()
    assert c.make_mask(1) is None and c.make_mask(3) == "causal"  # eager: KVCache's masks


def test_position_is_made_once_after_eager_writes_and_trims():
    c = StaticMLACache()
    c.update_and_fetch(mx.zeros((1, 1, 4, 2)), mx.zeros((1, 1, 4, 1)))
    p = c.position
    assert p.item() == 4 and c.position is p  # the same device array until the next eager change
    c.trim(1)
    assert c.position.item() == 3
    c.offset = 2
    assert c.position.item() == 2 and c.size() == 2


def test_from_kv_cache_and_merge_into_batch_kv_cache():
    kv = KVCache()
    kv.update_and_fetch(mx.arange(6.0).reshape(1, 1, 3, 2), mx.arange(3.0).reshape(1, 1, 3, 1))
    st = StaticMLACache.from_kv_cache(kv)
    assert st.offset == 3 and st.capacity == 256
    assert mx.array_equal(st.keys[..., :3, :], kv.keys[..., :3, :]).item()
    merged = StaticMLACache.merge([st, StaticMLACache.from_kv_cache(kv)])
    assert type(merged) is BatchKVCache and merged.keys.shape == (2, 1, 3, 2)


def test_empty_cache_protocol():
    c = StaticMLACache()
    assert c.empty() and c.nbytes == 0 and c.size() == 0 and c.is_trimmable()
    assert c.trim(4) == 0
    with pytest.raises(ValueError, match="min_capacity"):
        StaticMLACache(min_capacity=0)
