"""mla_block over zmlx's StaticMLACache: eagerly, and inside compiled_decode's traced step (the
rope row gathered at the device position, the cache's own write at it, mla_decode_len over
the whole buffers with the device length). On the CPU every launch runs its reference, and the
compiled step is bitwise eager mla_block over mlx-lm's KVCache while the context fits one
chunk of both (up to 16 positions: mla_decode's chunk over the slice is 32, mla_decode_len's
span over the 256-position bucket is 16): the same float32 reference ops over the same
positions, and the chunks past the length add exact zeros."""

import dataclasses

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

import zmlx
from zmlx.fidelity import greedy_logits
from zmlx.patch import mla_layer
from zmlx.patch.patterns import compiled_decode, mla_block
from zmlx.static_cache import StaticMLACache

PROMPT = mx.array([[3, 14, 15, 92, 65, 35, 8]])


pytestmark = pytest.mark.usefixtures("blocks_on_the_cpu")


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert mx.array_equal(x, y).item()


def _run(model, prompt, steps, patterns):
    zmlx.patch(model, patterns=patterns)
    try:
        return greedy_logits(model, prompt, steps), compiled_decode.stats(model)
    finally:
        zmlx.unpatch(model)


@pytest.mark.parametrize("which", ["tiny_f32", "tiny_q4"])
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_steps_run_the_launches_bitwise_eager_mla_block(request, no_stock_attention, which, batch):
    model, _ = request.getfixturevalue(which)
    prompt = mx.random.randint(1, model.args.vocab_size, (batch, 7), key=mx.random.key(batch))
    eager, _ = _run(model, prompt, 9, "mla_block")  # contexts of 8 to 16 positions
    ours, stats = _run(model, prompt, 9, "mla_block,compiled_decode")
    assert stats["compiled_steps"] == 9 and stats["traces"] == 1 and stats["stock_steps"] == {}
    _same(eager, ours)


def test_the_compiled_step_goes_through_mla_decode_len(tiny_q4, monkeypatch):
    """A device-length decode whose output is off by 1% moves the compiled steps' logits (and
    not eager mla_block's over KVCache, which runs mla_decode)."""
    model, _ = tiny_q4
    honest, _ = _run(model, PROMPT, 2, "mla_block,compiled_decode")
    k = mla_block.mla_decode_len

    def off(*a, **kw):
        o, m, lsum = k.reference(*a, **kw)
        return o * 1.01, m, lsum

    monkeypatch.setattr(mla_block, "mla_decode_len", dataclasses.replace(k, reference=off))
    mla_block._BLOCKS.clear()
    eager, _ = _run(model, PROMPT, 2, "mla_block")
    _same(honest, eager)
    changed, _ = _run(model, PROMPT, 2, "mla_block,compiled_decode")
    _same(honest[:1], changed[:1])  # the prompt: mlx-lm's layer
    assert not mx.array_equal(honest[1], changed[1]).item()


def test_retraces_only_at_capacity_buckets(tiny_q4, no_stock_attention):
    model, _ = tiny_q4
    prompt = mx.random.randint(1, model.args.vocab_size, (1, 250), key=mx.random.key(7))
    eager, _ = _run(model, prompt, 10, "mla_block")
    zmlx.patch(model, patterns="mla_block,compiled_decode")
    try:
        ours = greedy_logits(model, prompt, 10)  # 250 + 10 positions: buckets 256, then 512
        stats = compiled_decode.stats(model)
        assert stats["traces"] == 2 and stats["compiled_steps"] == 10
        greedy_logits(model, prompt[:, :20], 10)  # known buckets: no trace
        assert compiled_decode.stats(model)["traces"] == 2
    finally:
        zmlx.unpatch(model)
    _same(eager, ours)


def test_eager_steps_over_a_static_cache_equal_kvcache(tiny_q4, no_stock_attention):
    """Without compiled_decode a StaticMLACache is in eager mode: the launches run over its
    valid slice, as over KVCache."""
    model, _ = tiny_q4
    zmlx.patch(model, patterns="mla_block")
    try:
        outs = {}
        for kind in (KVCache, StaticMLACache):
            cache = [kind() for _ in model.layers]
            logits = [model(PROMPT, cache=cache)]
            for _ in range(4):
                logits.append(model(mx.argmax(logits[-1][:, -1:], axis=-1), cache=cache))
            mx.eval(logits)
            outs[kind] = logits
    finally:
        zmlx.unpatch(model)
    _same(outs[KVCache], outs[StaticMLACache])


def test_a_mask_with_an_eager_static_cache_runs_mlx_lms_attention(tiny_q4):
    """Only a traced step's mask (the cache's own valid positions) is taken as the length."""
    cache = StaticMLACache()
    cache.update_and_fetch(mx.zeros((1, 1, 3, 4)), mx.zeros((1, 1, 3, 2)))
    assert not mla_layer.regime(mx.array([[True]]), cache)
    assert mla_layer.regime(None, cache)
    cache.trace_at(cache.keys, cache.values, mx.array(3, mx.int32))
    try:
        assert mla_layer.regime(cache.make_mask(1), cache)
    finally:
        cache.end_trace()


# ---------------------------------------------------------------- on the GPU (the lead runs these)


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["tiny_q4", "tiny_f32"])
def test_on_the_gpu_compiled_steps_run_the_kernels_close_to_eager(request, no_stock_attention, which):
    """compiled_decode + mla_block on the GPU: every decode step compiled, one trace, the
    launches planned as kernels (mla_decode_len's self-check passed), and the logits of
    teacher-forced steps (eager mla_block's tokens) close to eager mla_block's over KVCache
    (mx.compile's fusion may round elsewhere; the partials themselves are bitwise mla_decode's:
    tests/kernels/test_mla_decode_len.py)."""
    mx.set_default_device(mx.gpu)  # blocks_on_the_cpu puts the CPU back afterwards
    model, _ = request.getfixturevalue(which)
    eager, _ = _run(model, PROMPT, 8, "mla_block")
    tokens = [mx.argmax(x[:, -1:], axis=-1) for x in eager[:-1]]
    zmlx.patch(model, patterns="mla_block,compiled_decode")
    try:
        cache = model.make_cache()
        ours = [model(PROMPT, cache=cache)] + [model(t, cache=cache) for t in tokens]
        mx.eval(ours)
        stats = compiled_decode.stats(model)
    finally:
        zmlx.unpatch(model)
    assert stats["compiled_steps"] == 8 and stats["traces"] == 1 and stats["stock_steps"] == {}
    assert mla_block.mla_decode_len.plan().path == "kernel", mla_block.mla_decode_len.plan().reason
    for e, o in zip(eager, ours):
        e, o = e.astype(mx.float32), o.astype(mx.float32)
        assert mx.isfinite(o).all().item()
        # test_mla_block's rule: a rounding may flip a tiny random router's expert now and then
        assert (mx.abs(e - o).mean() <= 0.35 * mx.abs(e).mean()).item()


@pytest.mark.cuda
def test_on_the_gpu_the_compiled_steps_cache_writes_are_scatters(tiny_f32):
    """The compiled step writes the cache with one scatter a buffer, as eager mla_block writes
    it with one slice update: no DynamicSliceUpdate offset kernels (on the full-size model
    they were ~2 of a layer's kernels: 578 a token compiled against 477 eager,
    `fc59315475`, `5e48ad14e5`), and one scatter kernel for each buffer of each layer."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    from zmlx.bench.harness import cuda_kernels

    mx.set_default_device(mx.gpu)  # blocks_on_the_cpu puts the CPU back afterwards
    model, _ = tiny_f32
    zmlx.patch(model, patterns="mla_block,compiled_decode")
    try:
        cache = model.make_cache()
        tok = mx.argmax(model(PROMPT, cache=cache)[:, -1:], axis=-1)
        for _ in range(2):  # the trace and the kernels' builds, outside the profiled steps
            tok = mx.argmax(model(tok, cache=cache)[:, -1:], axis=-1)
            mx.eval(tok)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prof = profile(activities=[ProfilerActivity.CUDA])
        with prof:
            for _ in range(2):
                tok = mx.argmax(model(tok, cache=cache)[:, -1:], axis=-1)
                mx.eval(tok)
        assert compiled_decode.stats(model)["stock_steps"] == {}
    finally:
        zmlx.unpatch(model)
    names = [e.name for e in cuda_kernels(prof)]
    assert not [n for n in names if "dynamic_offset" in n], names
    scatters = [n for n in names if "scatter_axis" in n]
    assert len(scatters) == 2 * 2 * model.args.num_hidden_layers, names  # 2 steps x 2 buffers
