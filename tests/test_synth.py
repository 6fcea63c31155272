"""Synthetic checkpoints: mlx_lm.load reads them unchanged; seeded; not degenerate."""

import json
import signal
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from zmlx import synth


def _params(model):
    return dict(tree_flatten(model.parameters()))


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        assert mx.array_equal(pa[k], pb[k]).item(), k


def test_spec_parsing_and_errors():
    s = synth.SynthSpec.parse("synth:glm4_moe_lite/flash/affine4@7")
    assert (s.family, s.preset, s.quant, s.seed) == ("glm4_moe_lite", "flash", "affine4", 7)
    assert synth.SynthSpec.parse(s.name) == s
    for bad, msg in [
        ("synth:glm4_moe_lite/tiny", "use synth:FAMILY/PRESET/QUANT"),
        ("synth:llama/tiny/bf16", "unknown family"),
        ("synth:glm4_moe_lite/huge/bf16", "unknown preset"),
        ("synth:glm4_moe_lite/tiny/int3", "unknown quantization"),
        ("synth:glm4_moe_lite/tiny/bf16@x", "bad seed"),
    ]:
        with pytest.raises(synth.SynthError, match=msg):
            synth.SynthSpec.parse(bad)


def test_bf16_checkpoint_has_hub_layout_and_loads_like_build(tmp_path):
    out = synth.write("synth:glm4_moe_lite/tiny/bf16", tmp_path / "ckpt")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    # What mlx-lm's sanitize must stack and split.
    assert "model.layers.1.mlp.experts.63.down_proj.weight" in index
    assert "model.layers.0.self_attn.kv_b_proj.weight" in index
    assert "model.layers.1.mlp.switch_mlp.gate_proj.weight" not in index
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "glm4_moe_lite" and "quantization" not in config
    loaded, tok = mlx_lm.load(str(out))
    built, _ = synth.build("synth:glm4_moe_lite/tiny/bf16")
    _assert_same_params(loaded, built)
    assert _params(loaded)["model.layers.1.mlp.switch_mlp.gate_proj.weight"].shape == (64, 64, 128)
    assert _params(loaded)["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    assert tok.encode("hello") and tok.eos_token_ids == {synth.EOS_ID}
    assert len(tok._tokenizer) == config["vocab_size"]


@pytest.mark.parametrize("quant,bits", [("affine4", 4), ("affine8", 8), ("mxfp4", 4)])
def test_quantized_checkpoint_loads_like_build(tmp_path, quant, bits):
    out = synth.write(f"synth:glm4_moe_lite/tiny/{quant}", tmp_path / quant)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    loaded, _ = mlx_lm.load(str(out))
    built, _ = synth.build(f"synth:glm4_moe_lite/tiny/{quant}")
    _assert_same_params(loaded, built)
    p = _params(loaded)
    assert p["model.layers.1.mlp.switch_mlp.down_proj.weight"].dtype == mx.uint32
    assert "model.layers.0.self_attn.embed_q.scales" in p  # the absorbed MLA projections too
    assert p["model.layers.1.mlp.gate.weight"].dtype == mx.bfloat16  # the router stays bf16


def test_seeded_and_reproducible():
    a, _ = synth.build("synth:glm4_moe_lite/tiny/affine4")
    b, _ = synth.build("synth:glm4_moe_lite/tiny/affine4")
    c, _ = synth.build("synth:glm4_moe_lite/tiny/affine4@1")
    _assert_same_params(a, b)
    key = "model.layers.2.self_attn.q_a_proj.weight"
    assert not mx.array_equal(_params(a)[key], _params(c)[key]).item()


@pytest.mark.parametrize("fixture", ["tiny_q4", "tiny_f32"])
def test_greedy_decoding_is_not_degenerate(request, fixture):
    model, tok = request.getfixturevalue(fixture)
    prompt = mx.array(tok.encode("Once upon a time"))
    tokens = [int(t) for (t, _), _ in zip(generate_step(prompt, model, max_tokens=64), range(64))]
    assert len(tokens) == 64
    assert len(set(tokens)) >= 32, tokens
    assert synth.EOS_ID not in tokens


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_write_marks_its_directory_and_replaces_only_that(tmp_path):
    out = synth.write("synth:glm4_moe_lite/tiny/affine4", tmp_path / "ckpt")
    manifest = json.loads((out / synth.MANIFEST).read_text())
    assert manifest["spec"] == "synth:glm4_moe_lite/tiny/affine4"
    assert sorted(manifest["files"] + [synth.MANIFEST]) == sorted(p.name for p in out.iterdir())
    with pytest.raises(synth.SynthError, match="exists"):
        synth.write("synth:glm4_moe_lite/tiny/affine4", out)
    synth.write("synth:glm4_moe_lite/tiny/affine4@1", out, overwrite=True)
    assert json.loads((out / synth.MANIFEST).read_text())["spec"] == "synth:glm4_moe_lite/tiny/affine4@1"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(synth.SynthError, match="not a directory zmlx wrote"):
        synth.write("synth:glm4_moe_lite/tiny/affine4", mine, overwrite=True)
    assert _tree(mine) == {"keep.txt": b"mine"}


def test_write_that_fails_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    out = synth.write("synth:glm4_moe_lite/tiny/affine4", tmp_path / "ckpt")
    before = _tree(out)

    def broken(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "write_tokenizer", broken)
    with pytest.raises(KeyboardInterrupt):
        synth.write("synth:glm4_moe_lite/tiny/affine4@1", out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir left
    assert _tree(out) == before  # the old one is intact


def test_chat_template_works_on_the_loaded_checkpoint(tmp_path):
    out = synth.write("synth:glm4_moe_lite/tiny/affine4", tmp_path / "ckpt")
    model, tok = mlx_lm.load(str(out))
    assert tok.has_chat_template
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert tok.decode(prompt) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    # What `mlx_lm chat` does with each turn.
    assert len(tok.encode(mlx_lm.generate(model, tok, prompt, max_tokens=4))) >= 1


def test_memory_estimate_of_the_real_size():
    gb = synth.estimate_bytes("synth:glm4_moe_lite/flash/affine4") / 1e9
    assert 15 < gb < 19  # GLM-4.7-Flash 4-bit is about 17 GB
    tiny, _ = synth.build("synth:glm4_moe_lite/tiny/affine4")
    actual = sum(v.nbytes for v in _params(tiny).values())
    assert abs(synth.estimate_bytes("synth:glm4_moe_lite/tiny/affine4") - actual) < 0.05 * actual


def _synth(*args, cwd=None):
    cmd = [sys.executable, "-m", "zmlx.synth", "glm4_moe_lite", "--preset", "tiny", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)


def _refused(p):
    return p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: ")


@pytest.mark.slow
def test_synth_cli(tmp_path):
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "zmlx.synth", "glm4_moe_lite", "--preset", "tiny", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "wrote synth:glm4_moe_lite/tiny/affine4" in p.stdout
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 2 and "exists" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_synth_cli_refuses_what_zmlx_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("data")
    for out in (mine, afile, "."):
        p = _synth("--out", out, "--overwrite", cwd=tmp_path)
        assert _refused(p), (out, p.returncode, p.stderr)
    assert _tree(tmp_path) == {"mine/notes.txt": b"mine", "afile": b"data"}
    empty = tmp_path / "empty"
    empty.mkdir()
    p = _synth("--out", empty)
    assert p.returncode == 0, p.stderr


# The CLI with a tokenizer writer that stalls once the weights are written.
SLOW_SYNTH = """
import sys, time
from zmlx import synth, ui
from zmlx.cli.synth import command

def stalled_tokenizer(out, vocab_size):
    print("writing", flush=True)
    time.sleep(300)

synth.write_tokenizer = stalled_tokenizer
sys.argv[1:] = ["--out", sys.argv[1], "--overwrite"]
ui.run_command(command)
"""


@pytest.mark.slow
def test_sigterm_during_the_write_leaves_the_old_checkpoint_and_no_temporary(tmp_path):
    out = synth.write("synth:glm4_moe_lite/tiny/affine4", tmp_path / "ckpt")
    before = _tree(out)
    p = subprocess.Popen([sys.executable, "-c", SLOW_SYNTH, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "writing\n"
        assert len(list(tmp_path.iterdir())) == 2  # the new one is half-written beside it
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        p.kill()
        p.wait()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]
    assert _tree(out) == before


@pytest.mark.slow
def test_mlx_lm_chat_runs_on_a_synthetic_checkpoint(tmp_path):
    out = synth.write("synth:glm4_moe_lite/tiny/affine4", tmp_path / "ckpt")
    cmd = [sys.executable, "-m", "mlx_lm", "chat", "--model", str(out), "--max-tokens", "4"]
    p = subprocess.run(cmd, input="hi\nq\n", capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
