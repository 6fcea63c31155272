"""Synthetic checkpoints of every family beyond glm4_moe_lite: mlx_lm.load reads them as
build makes them, greedy decoding is not degenerate, each family's structure is kept, and
the real-size and layer-faithful presets have the published models' per-layer shapes."""

import json

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import RotatingKVCache

from zmlx import synth
from zmlx.synth_families import FAMILIES

NEW = [
    "deepseek_v3",
    "kimi_k25",
    "deepseek_v32",
    "glm_moe_dsa",
    "glm4_moe",
    "qwen3_moe",
    "gpt_oss",
    "mixtral",
]
DECODE = 64


def _params(model):
    return dict(tree_flatten(model.parameters()))


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        assert mx.array_equal(pa[k], pb[k]).item(), k


def _greedy(model, tok):
    prompt = mx.array(tok.encode("Once upon a time"))
    return [int(t) for (t, _), _ in zip(generate_step(prompt, model, max_tokens=DECODE), range(DECODE))]


def _text(model):
    return model.language_model if hasattr(model, "language_model") else model


def _structure(family, model, cfg):
    """The family's structural features, on the loaded model and its config."""
    layers = _text(model).model.layers
    if family in ("deepseek_v3", "kimi_k25", "deepseek_v32", "glm_moe_dsa"):
        assert hasattr(layers[0].mlp, "gate_proj") and hasattr(layers[1].mlp, "shared_experts")
        gate = layers[1].mlp.gate
        assert gate.e_score_correction_bias.dtype == mx.float32
        if family in ("deepseek_v3", "deepseek_v32"):
            assert (gate.n_group, gate.topk_group) == (8, 4)  # group-limited routing
            assert gate.n_routed_experts % gate.n_group == 0
        if family in ("deepseek_v32", "glm_moe_dsa"):
            # The DSA indexer, keeping fewer positions than the decode holds: the sparse path runs.
            assert hasattr(layers[0].self_attn, "indexer")
            assert cfg["index_topk"] < DECODE
    elif family == "glm4_moe":
        attn = layers[0].self_attn
        assert "bias" in attn.q_proj and hasattr(layers[1].mlp, "shared_experts")
        assert hasattr(layers[0].mlp, "gate_proj") and cfg["partial_rotary_factor"] == 0.5
        assert layers[1].mlp.gate.e_score_correction_bias.dtype == mx.float32
    elif family == "qwen3_moe":
        assert not hasattr(layers[0].mlp, "shared_experts") and cfg["norm_topk_prob"]
        assert hasattr(layers[0].self_attn, "q_norm")
    elif family == "gpt_oss":
        attn, mlp = layers[0].self_attn, layers[0].mlp
        assert mx.any(attn.sinks != 0).item() and "bias" in mlp.router and "bias" in mlp.experts.down_proj
        assert cfg["layer_types"][:2] == ["sliding_attention", "full_attention"]
        assert cfg["sliding_window"] < DECODE
        assert any(isinstance(c, RotatingKVCache) for c in model.make_cache())
    elif family == "mixtral":
        assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (8, 2)
        assert hasattr(layers[0].block_sparse_moe, "switch_mlp")


@pytest.mark.parametrize("family", NEW)
def test_tiny_checkpoint_loads_like_build_and_decodes(tmp_path, family):
    spec = f"synth:{family}/tiny/affine4"
    out = synth.write(spec, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["quantization"]["bits"] == 4
    loaded, tok = mlx_lm.load(str(out))
    built, _ = synth.build(spec)
    _assert_same_params(loaded, built)
    _structure(family, loaded, config.get("text_config", config))
    tokens = _greedy(loaded, tok)
    assert len(tokens) == DECODE and synth.EOS_ID not in tokens
    assert len(set(tokens)) >= DECODE // 2, tokens
    # The estimate is the loaded model's own bytes.
    assert synth.estimate_bytes(spec) == sum(v.nbytes for v in _params(loaded).values())


# Names only the stored layout has: per-expert tensors that mlx-lm's sanitize stacks (Hub),
# or mlx-lm's stacked experts (gpt_oss: sanitize converts only the Hub's mxfp4 blocks).
STORED = {
    "deepseek_v3": "model.layers.1.mlp.experts.63.down_proj.weight",
    "kimi_k25": "language_model.model.layers.1.mlp.experts.63.down_proj.weight",
    "deepseek_v32": "model.layers.1.self_attn.indexer.wq_b.weight",
    "glm_moe_dsa": "model.layers.0.self_attn.kv_b_proj.weight",
    "glm4_moe": "model.layers.1.mlp.experts.63.up_proj.weight",
    "qwen3_moe": "model.layers.0.mlp.experts.63.gate_proj.weight",
    "gpt_oss": "model.layers.0.mlp.experts.gate_proj.bias",
    "mixtral": "model.layers.3.block_sparse_moe.experts.7.w2.weight",
}


@pytest.mark.parametrize("family", NEW)
def test_bf16_checkpoint_has_the_family_layout_and_loads_like_build(tmp_path, family):
    spec = f"synth:{family}/tiny/bf16"
    out = synth.write(spec, tmp_path / "ckpt")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert STORED[family] in index
    assert FAMILIES[family].layout == ("mlx" if family == "gpt_oss" else "hub")
    assert "quantization" not in json.loads((out / "config.json").read_text())
    loaded, tok = mlx_lm.load(str(out))
    built, _ = synth.build(spec)
    _assert_same_params(loaded, built)
    assert (
        len(tok._tokenizer)
        == synth.model_config(synth.SynthSpec.parse(spec)).get(
            "text_config", synth.model_config(synth.SynthSpec.parse(spec))
        )["vocab_size"]
    )


@pytest.mark.parametrize(
    "family,quant", [("gpt_oss", "mxfp4"), ("deepseek_v3", "mxfp4"), ("qwen3_moe", "affine8")]
)
def test_other_quantizations_load_like_build(tmp_path, family, quant):
    spec = f"synth:{family}/tiny/{quant}"
    out = synth.write(spec, tmp_path / "ckpt")
    loaded, tok = mlx_lm.load(str(out))
    built, _ = synth.build(spec)
    _assert_same_params(loaded, built)
    assert len(set(_greedy(loaded, tok))) >= DECODE // 2


def test_new_families_are_seeded_by_spec():
    a, _ = synth.build("synth:qwen3_moe/tiny/affine4")
    b, _ = synth.build("synth:qwen3_moe/tiny/affine4@1")
    key = "model.layers.2.self_attn.q_proj.weight"
    assert not mx.array_equal(_params(a)[key], _params(b)[key]).item()


# The published configs (hidden size, layers, experts, top-k, heads, MoE width, vocabulary).
REAL = {
    ("qwen3_moe", "30b_a3b"): dict(  # Qwen3-30B-A3B
        hidden_size=2048,
        num_hidden_layers=48,
        num_experts=128,
        num_experts_per_tok=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        moe_intermediate_size=768,
        vocab_size=151936,
    ),
    ("gpt_oss", "20b"): dict(  # gpt-oss-20b
        hidden_size=2880,
        num_hidden_layers=24,
        num_local_experts=32,
        num_experts_per_tok=4,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=2880,
        sliding_window=128,
        vocab_size=201088,
    ),
    ("glm4_moe", "air"): dict(  # GLM-4.5-Air
        hidden_size=4096,
        num_hidden_layers=46,
        n_routed_experts=128,
        num_experts_per_tok=8,
        num_attention_heads=96,
        num_key_value_heads=8,
        head_dim=128,
        moe_intermediate_size=1408,
        n_shared_experts=1,
        vocab_size=151552,
    ),
    ("mixtral", "8x7b"): dict(  # Mixtral-8x7B
        hidden_size=4096,
        num_hidden_layers=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
    ),
}
DEEPSEEK_V3 = dict(  # DeepSeek-V3 / R1 per layer
    hidden_size=7168,
    n_routed_experts=256,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    num_attention_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    moe_intermediate_size=2048,
    intermediate_size=18432,
)
FAITHFUL = {
    ("deepseek_v3", "layers4"): (4, 61, DEEPSEEK_V3),
    ("deepseek_v3", "layers12"): (12, 61, DEEPSEEK_V3),
    ("deepseek_v32", "layers4"): (4, 61, {**DEEPSEEK_V3, "index_n_heads": 64, "index_topk": 2048}),
    ("deepseek_v32", "layers12"): (12, 61, {**DEEPSEEK_V3, "index_n_heads": 64, "index_topk": 2048}),
    ("kimi_k25", "layers4"): (4, 61, dict(hidden_size=7168, n_routed_experts=384, num_attention_heads=64)),
    ("kimi_k25", "layers8"): (8, 61, dict(hidden_size=7168, n_routed_experts=384, num_experts_per_tok=8)),
    ("glm_moe_dsa", "layers4"): (
        4,
        78,
        dict(  # GLM-5 per layer
            hidden_size=6144,
            n_routed_experts=256,
            num_experts_per_tok=8,
            num_attention_heads=64,
            q_lora_rank=2048,
            qk_nope_head_dim=192,
            v_head_dim=256,
            index_n_heads=32,
            index_topk=2048,
        ),
    ),
    ("glm_moe_dsa", "layers12"): (12, 78, dict(hidden_size=6144, n_routed_experts=256)),
}
H200 = 140e9


def test_every_family_and_preset_is_covered():
    assert sorted(NEW) == sorted(FAMILIES)
    named = {k for k in (*REAL, *FAITHFUL)}
    assert named == {(f, p) for f in NEW for p in FAMILIES[f].presets if p != "tiny"}


@pytest.mark.parametrize("family,preset", sorted(REAL))
def test_real_size_presets_have_the_published_shapes_and_fit_one_h200(family, preset):
    spec = synth.SynthSpec(family, preset, "affine4")
    cfg = synth.model_config(spec)
    assert {k: cfg[k] for k in REAL[family, preset]} == REAL[family, preset]
    assert synth.layer_faithful(spec) is None
    assert synth.estimate_bytes(spec) < H200
    assert synth.estimate_bytes(synth.SynthSpec(family, preset, "mxfp4")) < H200


@pytest.mark.parametrize("family,preset", sorted(FAITHFUL))
def test_layer_faithful_presets_have_real_layers_fewer_of_them_and_say_so(family, preset):
    layers, real_layers, shapes = FAITHFUL[family, preset]
    spec = synth.SynthSpec(family, preset, "affine4")
    cfg = synth.model_config(spec)
    text = cfg.get("text_config", cfg)
    assert {k: text[k] for k in shapes} == shapes
    assert text["num_hidden_layers"] == layers and preset == f"layers{layers}"
    label = synth.layer_faithful(spec)
    assert label and "layer-faithful" in label and f"{layers} of {real_layers} layers" in label
    assert synth.estimate_bytes(spec) < H200


def test_a_layer_faithful_checkpoint_records_its_label(tmp_path, monkeypatch):
    # The real layer-faithful presets are tens of GB: label the tiny one the same way.
    monkeypatch.setitem(FAMILIES["deepseek_v3"].faithful, "tiny", "layer-faithful: test label")
    out = synth.write("synth:deepseek_v3/tiny/affine4", tmp_path / "ckpt")
    assert (
        json.loads((out / "config.json").read_text())["zmlx_synth"]["layer_faithful"]
        == "layer-faithful: test label"
    )
    assert json.loads((out / synth.MANIFEST).read_text())["layer_faithful"] == "layer-faithful: test label"
    plain = synth.write("synth:qwen3_moe/tiny/affine4", tmp_path / "plain")
    assert "layer_faithful" not in json.loads((plain / "config.json").read_text())["zmlx_synth"]


def test_unknown_preset_lists_the_family_presets():
    with pytest.raises(synth.SynthError, match="known: tiny, layers4, layers12"):
        synth.SynthSpec.parse("synth:deepseek_v3/flash/affine4")
