"""Every family zmlx knows, as a tiny random model built here from mlx-lm's own ModelArgs and
Model (not zmlx.synth): patched with its default preset, with each backend's preset and with
each pattern that applies, its logits are bitwise stock on the CPU (the kernels run their
references there), for prompts and decode steps, batch 1 and 2, with and without a cache.
The close patterns (mla_attention, mla_block: float32 attention) are judged close instead."""

from __future__ import annotations

import functools
import importlib
import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import zmlx
from zmlx.families import FAMILIES
from zmlx.fidelity import greedy_logits

_MLA = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=16,
    num_experts_per_tok=4,
    routed_scaling_factor=2.5,
    kv_lora_rank=128,  # mla_block's launches take latents of multiples of 128
    q_lora_rank=64,
    qk_rope_head_dim=64,
    qk_nope_head_dim=64,
    v_head_dim=64,
    first_k_dense_replace=1,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    n_group=1,
    topk_group=1,
    moe_layer_freq=1,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    attention_bias=False,
)
# DeepSeek-V3 and V3.2 route group-limited (8 groups, 4 kept, on the real models); Kimi-K2 and
# GLM-5 in one group: both kinds are here.
_GROUPED = dict(n_group=4, topk_group=2)
_DSA = dict(index_head_dim=64, index_n_heads=2, index_topk=4)  # 7-token prompts go sparse
_GQA = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling=None,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

CONFIGS: dict[str, dict] = {
    "deepseek_v3": {**_MLA, **_GROUPED, "model_type": "deepseek_v3"},
    "kimi_k25": {"model_type": "kimi_k25", "text_config": {**_MLA, "model_type": "kimi_k2"}},
    "deepseek_v32": {**_MLA, **_GROUPED, **_DSA, "model_type": "deepseek_v32"},
    "glm_moe_dsa": {
        **_MLA,
        **_DSA,
        "model_type": "glm_moe_dsa",
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "glm4_moe": {
        **_GQA,
        "model_type": "glm4_moe",
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "n_shared_experts": 1,
        "n_routed_experts": 16,
        "routed_scaling_factor": 2.5,
        "num_experts_per_tok": 4,
        "first_k_dense_replace": 1,
        "use_qk_norm": True,
        "attention_bias": True,
        "partial_rotary_factor": 0.5,
    },
    "qwen3_moe": {
        **_GQA,
        "model_type": "qwen3_moe",
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],  # one dense layer, so swiglu_mlp and moe_block have a target
        "norm_topk_prob": True,
    },
    "mixtral": {**_GQA, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2},
    "gpt_oss": {
        **_GQA,
        "model_type": "gpt_oss",
        "num_local_experts": 8,
        "num_experts_per_tok": 4,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
}


def _random_like(name: str, p: mx.array, key) -> mx.array:
    """Random weights, scaled so that the activations stay O(1) and the routers decide."""
    if name.endswith("e_score_correction_bias"):
        return mx.random.normal(p.shape, key=key) * 0.05
    if p.ndim == 1:
        norm = "norm" in name.rsplit(".", 2)[-2] if "." in name else False
        return (1.0 if norm else 0.0) + mx.random.normal(p.shape, key=key) * 0.1
    if "embed_tokens" in name:
        return mx.random.normal(p.shape, key=key)
    return mx.random.normal(p.shape, key=key) * (2.0 / math.sqrt(p.shape[-1]))


# rope_scaling yarn (mlx-lm's YarnRoPE), as the real models have it: DeepSeek-V3's (the rope's
# mscale 1, the attention scale times mscale_all_dim's factor squared) and one whose rope
# scales its input (mscale_all_dim 0: mscale 1 + 0.1 ln 32), on Kimi's classes.
YARN = {
    "deepseek_v3": dict(
        type="yarn",
        factor=40.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        original_max_position_embeddings=4096,
        beta_fast=32,
        beta_slow=1,
    ),
    "kimi_k25": dict(
        type="yarn", factor=32.0, mscale=1.0, original_max_position_embeddings=4096, beta_fast=1
    ),
}


def _with_yarn(family: str, config: dict) -> dict:
    if "text_config" in config:
        return {**config, "text_config": _with_yarn(family, config["text_config"])}
    return {**config, "rope_scaling": YARN[family], "max_position_embeddings": 163840}


# On the H200, stock MLX serves some of the 64-wide projections badly at a 7-token prompt: no
# quantized_matmul for the MLA's non-transposed 64-wide unembed (an error), and the shared
# expert's 64-wide projections come out different from run to run (stock against stock:
# benchmarks/results/20261130-h200-diag-stock-determinism*-s5.log). The GPU tests build the
# same models with those widths at 128 (`cuda_widths`), where stock is served by its kernels.
CUDA_WIDTHS = dict(moe_intermediate_size=128, q_lora_rank=128, qk_nope_head_dim=128, v_head_dim=128)


def _with_cuda_widths(config: dict) -> dict:
    if "text_config" in config:
        return {**config, "text_config": _with_cuda_widths(config["text_config"])}
    return {**config, **{k: v for k, v in CUDA_WIDTHS.items() if k in config}}


@functools.cache
def build(family: str, quant: str = "affine4", yarn: bool = False, cuda_widths: bool = False) -> nn.Module:
    """A tiny random model of `family` from mlx-lm's classes: affine 4-bit with bf16
    activations (as users run them), or float32 (MLX's CPU gather_mm needs float32);
    `yarn`: with the family's YARN rope_scaling; `cuda_widths`: with CUDA_WIDTHS."""
    config = _with_yarn(family, CONFIGS[family]) if yarn else CONFIGS[family]
    if cuda_widths:
        config = _with_cuda_widths(config)
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    params = tree_flatten(model.parameters())
    dtype = mx.bfloat16 if quant == "affine4" else mx.float32
    new = []
    for i, (name, p) in enumerate(params):
        v = _random_like(name, p, mx.random.key(1000 * len(family) + i))
        keep_f32 = name.endswith("e_score_correction_bias")  # mlx-lm's cast_predicate
        new.append((name, v.astype(mx.float32 if keep_f32 else dtype)))
    model.update(tree_unflatten(new))
    if quant == "affine4":
        nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def forward(model, prompt, steps: int, use_cache: bool) -> list[mx.array]:
    """Logits of a prompt then `steps` greedy decode steps (with a cache), or of full
    recomputes of the growing sequence (without)."""
    if use_cache:
        return greedy_logits(model, prompt, steps)
    outs, seq = [], prompt
    for _ in range(steps + 1):
        logits = model(seq)
        outs.append(logits)
        seq = mx.concatenate([seq, mx.argmax(logits[:, -1:], axis=-1)], axis=1)
    mx.eval(outs)
    return outs


def applied(result) -> set[str]:
    return {n for n, r in result.patterns.items() if r.patched}


# family -> the patterns that patch at least one module of its tiny model here (the rest are
# skipped with their reasons: tests/patch/test_families.py)
APPLIES = {
    "deepseek_v3": {
        "moe_router",
        "moe_combine",
        "downproj_combine",
        "moe_mlp",
        "swiglu_mlp",
        "glm47_rope",
        "mla_attention",
        "mla_block",
        "mla_prologue",
        "moe_block",
        "residual_norm",
        "compiled_decode",
    },
    "deepseek_v32": {"moe_router", "moe_combine", "downproj_combine", "moe_mlp", "swiglu_mlp", "moe_block"},
    "glm4_moe": {
        "moe_router",
        "moe_combine",
        "downproj_combine",
        "moe_mlp",
        "swiglu_mlp",
        "moe_block",
        "gqa_prologue",
        "compiled_decode",
    },
    "qwen3_moe": {
        "moe_mlp",
        "swiglu_mlp",
        "moe_block",
        "softmax_router",
        "downproj_combine",
        "gqa_prologue",
        "compiled_decode",
    },
    "mixtral": {
        "moe_mlp",
        "softmax_router",
        "downproj_combine",
        "moe_block",
        "gqa_prologue",
        "compiled_decode",
    },
    "gpt_oss": {"softmax_router", "moe_mlp", "moe_block", "gqa_prologue"},
}
APPLIES["kimi_k25"] = APPLIES["deepseek_v3"]
APPLIES["glm_moe_dsa"] = APPLIES["deepseek_v32"]
FAMILY_NAMES = sorted(APPLIES)
CLOSE_ON_CPU = {"mla_attention", "mla_block"}  # float32 attention: not stock's bf16 op sequence


def _cases():
    for family in FAMILY_NAMES:
        fam = FAMILIES[family]
        yield family, None  # the default preset here
        yield family, fam.preset_on("cuda")
        for name in sorted(APPLIES[family] - CLOSE_ON_CPU):
            yield family, (name,)
        yield family, together(family)


def together(family: str) -> tuple[str, ...]:
    """Every exact pattern that applies, less those another one wins over (downproj_combine
    takes moe_combine's method, residual_norm yields to moe_block): they compose."""
    return tuple(sorted(APPLIES[family] - CLOSE_ON_CPU - {"moe_combine", "residual_norm"}))


def _check_bitwise(model, patterns, stock_twice: bool = False):
    """`stock_twice` (the GPU tests): stock's logits must first repeat bitwise, else the
    comparison with the patched model would mean nothing (and the failure says so)."""
    for batch, use_cache in ((1, True), (2, True), (2, False)):
        prompt = mx.random.randint(1, 512, (batch, 7), key=mx.random.key(batch))
        stock = forward(model, prompt, 3, use_cache)
        if stock_twice:
            again = forward(model, prompt, 3, use_cache)
            same = [mx.array_equal(s, a).item() for s, a in zip(stock, again, strict=True)]
            assert all(same), (
                f"stock is not deterministic here (steps {same}, batch {batch}, cache {use_cache})"
            )
        result = zmlx.patch(model, patterns=patterns)
        try:
            patched = forward(model, prompt, 3, use_cache)
        finally:
            zmlx.unpatch(model)
        chosen = set(patterns if patterns is not None else FAMILIES[result.family].preset_on("cpu"))
        assert applied(result) == chosen & APPLIES[result.family]
        assert all(result.patterns[n].fidelity == "exact" for n in applied(result))
        for s, p in zip(stock, patched, strict=True):
            assert s.dtype == p.dtype
            assert mx.array_equal(s, p).item(), (patterns, batch, use_cache)


@pytest.mark.parametrize("family,patterns", list(_cases()))
def test_patched_family_is_bitwise_stock(family, patterns):
    _check_bitwise(build(family), patterns)


# patterns that refuse the unquantized model (test_gqa_prologue.py checks the reason): its
# projections are unquantized Linears with biases, which stock runs as one addmm
UNQUANTIZED_SKIPS = {"glm4_moe": {"gqa_prologue"}, "gpt_oss": {"gqa_prologue"}}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unquantized_family_is_bitwise_stock_with_every_exact_pattern(family):
    patterns = tuple(p for p in together(family) if p not in UNQUANTIZED_SKIPS.get(family, ()))
    _check_bitwise(build(family, "float32"), patterns)


@pytest.mark.parametrize(
    "family,pattern,yarn",
    [(f, p, yarn) for f in sorted(YARN) for p in sorted(CLOSE_ON_CPU) for yarn in (False, True)],
)
def test_close_attention_patterns_decode_close_to_stock(family, pattern, yarn):
    """mla_attention and mla_block attend in float32 with their own order (close even on the
    CPU): on the float32 model, teacher-forced, every step within float32 rounding of stock
    (reading a wrong head or position would move the logits by O(1)); the prompt bitwise."""
    from mlx_lm.models.cache import make_prompt_cache

    from zmlx.patch.patterns import mla_block

    model = build(family, "float32", yarn)
    prompt = mx.random.randint(1, 512, (2, 7), key=mx.random.key(2))
    stock = greedy_logits(model, prompt, 4)
    tokens = [mx.argmax(x[:, -1:], axis=-1) for x in stock[:-1]]
    result = zmlx.patch(model, patterns=[pattern])
    try:
        cache = make_prompt_cache(model)
        patched = [model(prompt, cache=cache)] + [model(t, cache=cache) for t in tokens]
        mx.eval(patched)
        plans = [mla_block.decode_plan(layer) for layer in model.layers]
    finally:
        zmlx.unpatch(model)
    if pattern == "mla_block":  # every decode step ran the launches (their references here)
        steps = [v for p in plans for v in p.values()]
        assert len(steps) == len(plans) and all(v.startswith("reference: ") for v in steps), plans
    assert result.patterns[pattern].fidelity == "close"
    assert len(result.patterns[pattern].patched) == CONFIGS["deepseek_v3"]["num_hidden_layers"]
    assert mx.array_equal(stock[0], patched[0]).item()
    for s, p in zip(stock, patched, strict=True):
        assert mx.allclose(s, p, rtol=1e-3, atol=1e-3).item()


@pytest.mark.parametrize("family", sorted(YARN))
@pytest.mark.parametrize("patterns", [("glm47_rope",), "cuda"])
def test_yarn_family_is_bitwise_stock_with_glm47_rope(family, patterns):
    """glm47_rope fuses YaRN's rope (on the CPU its reference: the table's frequencies, the
    input's mscale, the attention scale's factor), alone and in the family's CUDA preset."""
    from mlx_lm.models.rope_utils import YarnRoPE

    model = build(family, yarn=True)
    layers = model.language_model.model.layers if family == "kimi_k25" else model.model.layers
    rope = layers[0].self_attn.rope
    assert type(rope) is YarnRoPE and (rope.mscale == 1.0) == (family == "deepseek_v3")
    _check_bitwise(model, FAMILIES[family].preset_on("cuda") if patterns == "cuda" else patterns)


@pytest.mark.cuda
@pytest.mark.parametrize("family", sorted(YARN))
def test_on_cuda_yarn_family_is_bitwise_stock_with_the_glm47_rope_kernel(family):
    """On the GPU the decode steps run glm47_rope's kernel (YaRN's table and mscale): the
    logits stay bitwise stock's."""
    from zmlx.kernels.glm47_rope import glm47_rope

    assert glm47_rope.plan("cuda").path == "kernel", glm47_rope.plan("cuda").reason
    _check_bitwise(build(family, yarn=True), ("glm47_rope",))


@pytest.mark.parametrize("family", sorted(YARN))
def test_yarn_family_takes_glm47_rope_and_mla_block_on_every_layer(family):
    """mla_block's mla_q_prep ropes YaRN as glm47_rope does (its table, mscale and scale):
    both patch every layer (the decode steps: test_close_attention_patterns_decode_close_to_stock)."""
    model = build(family, yarn=True)
    result = zmlx.patch(model, patterns=["glm47_rope", "mla_block"])
    try:
        for name in ("glm47_rope", "mla_block"):
            report = result.patterns[name]
            assert len(report.patched) == CONFIGS["deepseek_v3"]["num_hidden_layers"], report.skipped
            assert not report.skipped, name
    finally:
        zmlx.unpatch(model)


def test_the_routers_epsilon_comes_from_the_family_data(monkeypatch):
    """moe_router renormalizes with the family's renorm_eps (glm4_moe: none, as mlx-lm): a
    family entry with another epsilon is caught by the same bitwise comparison."""
    import dataclasses

    from zmlx.families import Target

    fam = FAMILIES["glm4_moe"]
    wrong = {**fam.targets, "moe_router": Target("MoEGate", {"renorm_eps": 1e-3})}
    monkeypatch.setitem(FAMILIES, "glm4_moe", dataclasses.replace(fam, targets=wrong))
    model = build("glm4_moe")
    prompt = mx.random.randint(1, 512, (1, 7), key=mx.random.key(1))
    stock = forward(model, prompt, 2, True)
    zmlx.patch(model, patterns=["moe_router"])
    try:
        patched = forward(model, prompt, 2, True)
    finally:
        zmlx.unpatch(model)
    assert not all(mx.array_equal(s, p).item() for s, p in zip(stock, patched))
