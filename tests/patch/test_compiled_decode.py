"""compiled_decode on the tiny GLM-4.7-Flash (CPU): the compiled step is bitwise the eager one,
traces are made only at capacity buckets, mlx-lm's generate APIs work, unpatch restores."""

import pickle

import mlx.core as mx
import pytest
from mlx_lm import batch_generate, generate, stream_generate
from mlx_lm.models import glm4_moe_lite
from mlx_lm.models.cache import KVCache, make_prompt_cache

import zmlx
from zmlx.fidelity import greedy_logits
from zmlx.patch.patterns import compiled_decode
from zmlx.static_cache import StaticMLACache


@pytest.fixture
def patched(request):
    """patched(which, patterns) -> the tiny model patched with them (unpatched afterwards)."""
    models = []

    def make(which="tiny_q4", patterns="compiled_decode"):
        model, tok = request.getfixturevalue(which)
        zmlx.patch(model, patterns=patterns)
        models.append(model)
        return model, tok

    yield make
    for m in models:
        zmlx.unpatch(m)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert mx.array_equal(x, y).item()


@pytest.mark.parametrize("which", ["tiny_q4", "tiny_f32"])
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_steps_are_bitwise_stock(request, patched, which, batch):
    model, _ = request.getfixturevalue(which)
    prompt = mx.random.randint(1, model.args.vocab_size, (batch, 7), key=mx.random.key(batch))
    stock = greedy_logits(model, prompt, 12)
    patched(which)
    before = compiled_decode.stats(model)["compiled_steps"]
    ours = greedy_logits(model, prompt, 12)
    assert compiled_decode.stats(model)["compiled_steps"] - before == 12  # every step compiled
    _same(stock, ours)


@pytest.mark.parametrize("patterns", ["moe_router,moe_mlp,downproj_combine,glm47_rope", "moe_block"])
def test_other_patterns_run_inside_the_compiled_step(patched, tiny_q4, patterns):
    model, _ = tiny_q4
    prompt = mx.array([[3, 14, 15, 92, 65, 35]])
    zmlx.patch(model, patterns=patterns)
    eager = greedy_logits(model, prompt, 8)
    patched("tiny_q4", patterns + ",compiled_decode")
    _same(eager, greedy_logits(model, prompt, 8))
    assert compiled_decode.stats(model)["stock_steps"] == {}


def test_traces_only_at_capacity_buckets(patched):
    model, _ = patched()
    prompt = mx.random.randint(1, model.args.vocab_size, (1, 250), key=mx.random.key(7))
    zmlx.unpatch(model)
    stock_run = greedy_logits(model, prompt, 10)
    patched()
    ours = greedy_logits(model, prompt, 10)  # 250 + 10 positions: buckets 256, then 512
    _same(stock_run, ours)
    stats = compiled_decode.stats(model)
    assert stats["traces"] == 2 and stats["compiled_steps"] == 10
    greedy_logits(model, prompt[:, :20], 10)  # new generations in known buckets: no trace
    greedy_logits(model, prompt[:, :2], 3)
    assert compiled_decode.stats(model)["traces"] == 2
    greedy_logits(model, mx.concatenate([prompt[:, :5]] * 2), 3)  # batch 2: a new signature
    assert compiled_decode.stats(model)["traces"] == 3


def test_token_dtype_makes_no_new_trace(patched):
    """mlx-lm's generate feeds the prompt's last token as int32 and sampled tokens as uint32:
    one bucket, one trace, whatever the tokens' dtype."""
    model, _ = patched()
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[3, 14, 15]]), cache=cache))
    for dtype in (mx.int32, mx.uint32, mx.int32, mx.int64):
        mx.eval(model(mx.array([[92]], dtype=dtype), cache=cache))
    assert compiled_decode.stats(model)["traces"] == 1
    assert compiled_decode.stats(model)["compiled_steps"] == 4


@pytest.mark.parametrize("api", ["generate", "stream_generate"])
def test_mlx_lm_generate_apis_give_stock_text(patched, tiny_q4, api):
    model, tok = tiny_q4
    prompt = "a compiled step per token, traced once per bucket"

    def run():
        if api == "generate":
            return generate(model, tok, prompt, max_tokens=20)
        return [r.token for r in stream_generate(model, tok, prompt, max_tokens=20)]

    stock = run()
    patched()
    assert type(make_prompt_cache(model)[0]) is StaticMLACache
    before = compiled_decode.stats(model)["compiled_steps"]
    assert run() == stock
    assert compiled_decode.stats(model)["compiled_steps"] - before >= 19


def test_batch_generate_runs_stock_with_its_reason(patched, tiny_q4):
    model, tok = tiny_q4
    prompts = [[5, 9, 100, 7], [33, 61, 2, 8, 4, 11]]
    stock = batch_generate(model, tok, prompts, max_tokens=6, return_token_ids=True).token_ids
    patched()
    ours = batch_generate(model, tok, prompts, max_tokens=6, return_token_ids=True).token_ids
    assert ours == stock
    reasons = compiled_decode.stats(model)["stock_steps"]
    assert reasons.get("cache is not static (BatchKVCache)", 0) > 0


def test_new_weights_get_a_new_compiled_step(patched, tiny_f32):
    model, _ = patched("tiny_f32")
    prompt = mx.array([[3, 14, 15, 92]])
    greedy_logits(model, prompt, 3)
    old = model.lm_head.weight
    try:
        model.lm_head.weight = old * 1.5
        ours = greedy_logits(model, prompt, 3)
        zmlx.unpatch(model)
        _same(greedy_logits(model, prompt, 3), ours)
    finally:
        model.lm_head.weight = old


def test_unpatch_restores_the_model_exactly(patched, tiny_q4):
    model, _ = tiny_q4
    cls = type(model)
    result = zmlx.patch(model, patterns="compiled_decode")
    report = result.patterns["compiled_decode"]
    assert report.patched == ["<model>"] and report.fidelity == "exact"  # bitwise on the CPU
    assert type(model) is not cls and type(model).__zmlx_original__ is cls
    assert hasattr(model, "make_cache")
    zmlx.unpatch(model)
    assert type(model) is cls is glm4_moe_lite.Model
    assert not hasattr(model, "make_cache")
    assert type(make_prompt_cache(model)[0]) is KVCache


def test_pickled_model_loads_with_both_methods(patched):
    model, _ = patched()
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy.make_cache()[0]) is StaticMLACache
    assert type(copy).__call__ is type(model).__call__


def test_check_skips_models_without_attention_or_with_other_caches(tiny_q4):
    from zmlx import synth

    model, _ = tiny_q4
    assert compiled_decode.check(model, {}) is None
    attn = model.layers[1].self_attn
    del model.layers[1].self_attn
    try:
        assert "layer 1 has no self_attn" in compiled_decode.check(model, {})
    finally:
        model.layers[1].self_attn = attn
    oss, _ = synth.build("synth:gpt_oss/tiny/affine4")  # sliding-window layers first
    assert compiled_decode.check(oss, {}).startswith("layer 0's cache is RotatingKVCache, not KVCache")


def test_prompts_and_calls_without_static_caches_run_stock(patched, tiny_q4):
    model, _ = patched()
    kv = [KVCache() for _ in model.layers]
    logits = model(mx.array([[3, 4, 5]]), cache=kv)
    model(mx.argmax(logits[:, -1:], axis=-1), cache=kv)
    assert compiled_decode.stats(model)["stock_steps"] == {"cache is not static (KVCache)": 1}
    assert model(mx.array([[3]])).shape[:2] == (1, 1)  # no cache: stock, not counted


def _spy_row_args(monkeypatch) -> list[bool]:
    """A list that records, per traced layer, whether glm47_rope took its kernel's row path."""
    from zmlx.patch.patterns import glm47_rope as rope_pattern

    rows: list[bool] = []
    real = rope_pattern._row_args

    def spy(*a):
        got = real(*a)
        rows.append(got[0] is not None)
        return got

    monkeypatch.setattr(rope_pattern, "_row_args", spy)
    return rows


# ---------------------------------------------------------------- on the GPU (the lead runs these)


@pytest.mark.cuda
def test_on_the_gpu_glm47_rope_runs_its_kernel_inside_the_compiled_step(tiny_f32, monkeypatch):
    """Inside the traced step glm47_rope gathers the table row at the device position and
    launches its kernel (the row path: not mlx-lm's rope), and the logits of teacher-forced
    steps stay close to the eager patterns' (mx.compile may round elsewhere)."""
    mx.set_default_device(mx.gpu)
    try:
        model, _ = tiny_f32
        prompt = mx.array([[3, 14, 15, 92, 65, 35]])
        zmlx.patch(model, patterns="glm47_rope")
        try:
            eager = greedy_logits(model, prompt, 6)
        finally:
            zmlx.unpatch(model)
        rows = _spy_row_args(monkeypatch)
        tokens = [mx.argmax(x[:, -1:], axis=-1) for x in eager[:-1]]
        zmlx.patch(model, patterns="glm47_rope,compiled_decode")
        try:
            cache = model.make_cache()
            ours = [model(prompt, cache=cache)] + [model(t, cache=cache) for t in tokens]
            mx.eval(ours)
            stats = compiled_decode.stats(model)
        finally:
            zmlx.unpatch(model)
    finally:
        mx.set_default_device(mx.cpu)
    assert stats["compiled_steps"] == 6 and stats["traces"] == 1
    assert rows and all(rows), "a traced layer did not take glm47_rope's kernel"
    for e, o in zip(eager, ours):
        e, o = e.astype(mx.float32), o.astype(mx.float32)
        assert mx.isfinite(o).all().item()
        assert (mx.abs(e - o).mean() <= 0.35 * mx.abs(e).mean()).item()


def test_on_the_cpu_glm47_rope_leaves_traced_steps_to_mlx_lm(patched, monkeypatch):
    """Where glm47_rope runs its reference (the CPU) the traced step takes mlx-lm's rope with
    the array offset: the row path would hand the reference offset 0."""

    rows = _spy_row_args(monkeypatch)
    model, _ = patched("tiny_q4", "glm47_rope,compiled_decode")
    greedy_logits(model, mx.array([[3, 14, 15, 92, 65, 35]]), 4)
    assert compiled_decode.stats(model)["compiled_steps"] == 4
    assert rows and not any(rows)


def test_the_report_says_a_kernel_less_pattern_runs_mlx_ops(tiny_q4):
    model, _ = tiny_q4
    result = zmlx.patch(model, patterns="compiled_decode,moe_router")
    try:
        assert result.patterns["compiled_decode"].path == "mlx"  # not "kernel": it has none
        assert result.patterns["compiled_decode"].runs_on == "cpu (mlx)"
        assert result.patterns["moe_router"].path == "reference"  # a kernel's reference on the CPU
    finally:
        zmlx.unpatch(model)


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe", "mixtral"])
def test_gqa_families_decode_compiled_over_static_keys_and_values(family):
    """The GQA families' KVCache keys and values go into the static cache too: their decode
    steps run compiled (no stock step), bitwise mlx-lm's on the CPU, batch 1 and 2."""
    from test_family_exactness import build

    model = build(family)
    for batch in (1, 2):
        prompt = mx.random.randint(1, 512, (batch, 5), key=mx.random.key(batch))
        stock = greedy_logits(model, prompt, 4)
        zmlx.patch(model, patterns=["compiled_decode"])
        try:
            assert type(model.make_cache()[0]) is StaticMLACache
            got = greedy_logits(model, prompt, 4)
            stats = compiled_decode.stats(model)
        finally:
            zmlx.unpatch(model)
        assert stats["compiled_steps"] == 4 and stats["stock_steps"] == {} and stats["traces"] == 1
        assert all(mx.array_equal(s, g).item() for s, g in zip(stock, got, strict=True))


def test_gqa_prologue_runs_its_launches_inside_the_compiled_step():
    """With compiled_decode, Qwen3-MoE's traced steps take gqa_prologue's block (its rope row
    at the device position, the static cache's mask to the attention): the layer's decode
    plan names its launches for the traced step, and the logits stay mlx-lm's on the CPU."""
    from test_family_exactness import build

    from zmlx.patch.patterns import gqa_prologue

    model = build("qwen3_moe")
    prompt = mx.random.randint(1, 512, (1, 5), key=mx.random.key(3))
    stock = greedy_logits(model, prompt, 3)
    zmlx.patch(model, patterns=["compiled_decode", "gqa_prologue"])
    try:
        got = greedy_logits(model, prompt, 3)
        plans = gqa_prologue.decode_plan(model.layers[0])
        stats = compiled_decode.stats(model)
    finally:
        zmlx.unpatch(model)
    assert stats["compiled_steps"] == 3 and stats["stock_steps"] == {}
    assert plans and all(p.startswith("reference: norm_qkv_a, qk_norm_rope") for p in plans.values())
    assert all(mx.array_equal(s, g).item() for s, g in zip(stock, got, strict=True))
