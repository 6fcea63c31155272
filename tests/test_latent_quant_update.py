"""zmlx.latent_quant.update_and_fetch: mlx-lm's QuantizedKVCache.update_and_fetch without its
tree_maps. Fed the same steps (a prompt, decode steps across the 256-position growth, a trim,
batch 2, 4 and 8 bits), it leaves a cache that equals the one mlx-lm's method leaves, array
for array, and returns the same arrays' values."""

import time

import mlx.core as mx
import pytest
from mlx_lm.models.cache import QuantizedKVCache

from zmlx.latent_quant import update_and_fetch


def _same(a, b) -> bool:
    return all(mx.array_equal(x, y).item() for x, y in zip(a, b, strict=True))


def _step(n, batch, key):
    k1, k2 = mx.random.split(key)
    return mx.random.normal((batch, 1, n, 512), key=k1).astype(mx.bfloat16), mx.random.normal(
        (batch, 1, n, 64), key=k2
    ).astype(mx.bfloat16)


@pytest.mark.parametrize("bits,group,batch", [(4, 64, 1), (8, 32, 2)])
def test_it_leaves_the_cache_as_mlx_lms_method_does(bits, group, batch):
    ours, theirs = (
        QuantizedKVCache(group_size=group, bits=bits),
        QuantizedKVCache(group_size=group, bits=bits),
    )
    steps = [250] + [1] * 12 + ["trim"] + [1] * 5 + [300] + [1] * 3  # across two growths
    for i, n in enumerate(steps):
        if n == "trim":
            assert ours.trim(3) == theirs.trim(3) == 3
            continue
        keys, values = _step(n, batch, mx.random.key(i))
        got, want = update_and_fetch(ours, keys, values), theirs.update_and_fetch(keys, values)
        assert _same(got[0], want[0]) and _same(got[1], want[1]), i
        assert all(a.shape == b.shape for a, b in zip(got[0] + got[1], want[0] + want[1])), i
        assert ours.offset == theirs.offset
        assert _same(ours.keys, theirs.keys) and _same(ours.values, theirs.values), i
    assert ours.offset == 250 + 12 - 3 + 5 + 300 + 3


def test_a_step_spends_less_python_than_mlx_lms():
    """The point of it: the same graph with less Python a step (no tree_map)."""
    caches = [QuantizedKVCache(group_size=64, bits=4) for _ in range(2)]
    keys, values = _step(5, 1, mx.random.key(9))
    for c in caches:
        c.update_and_fetch(keys, values)
    mx.eval([c.state for c in caches])
    k1, v1 = _step(1, 1, mx.random.key(10))
    mx.eval(k1, v1)

    def timed(fn, cache):
        t0 = time.perf_counter()
        for _ in range(100):
            fn(cache)
            cache.trim(1)
        return time.perf_counter() - t0

    theirs, ours = [], []
    for _ in range(7):  # alternated, the fastest of each: a busy CPU slows both alike
        theirs.append(timed(lambda c: c.update_and_fetch(k1, v1), caches[0]))
        ours.append(timed(lambda c: update_and_fetch(c, k1, v1), caches[1]))
    assert min(ours) < min(theirs), (min(ours), min(theirs))
