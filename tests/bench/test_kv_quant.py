"""zmlx.bench.kv_quant (the quantized latent cache's KL table, bytes and decode time) and its
command, benchmarks/kv_quant_accuracy.py, on the CPU with the tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import zmlx
from zmlx.bench import kv_quant

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kv_quant_accuracy.py"
PROMPT = mx.array([(7 * i + 3) % 500 + 1 for i in range(40)])


@pytest.fixture
def patched(tiny_q4):
    model = tiny_q4[0]
    zmlx.patch(model, patterns=["mla_kv_quant"])
    yield model
    zmlx.unpatch(model)


def test_sides_bytes_and_the_rule(patched):
    sides = kv_quant.measure(patched, PROMPT, bits=(4, 8), tokens=6, chunk=16, timing_steps=1, repeats=2)
    assert [s.name for s in sides] == ["bf16", "q4", "q8"]
    bf16, q4, q8 = sides
    # the bf16 side is the yardstick: compared with itself it is 0, it has no verdict
    assert bf16.accurate is None and bf16.vs_bf16.kld_max == 0.0
    assert all(isinstance(s.accurate, bool) for s in (q4, q8))
    # MLX's affine format at group 64: 4.5 and 8.5 bits of 16 per element (scales, biases)
    assert q4.cache_bytes / bf16.cache_bytes == pytest.approx(4.5 / 16, rel=0.01)
    assert q8.cache_bytes / bf16.cache_bytes == pytest.approx(8.5 / 16, rel=0.01)
    # quantizing moves the distributions (it is not the bf16 cache again), 4-bit the most
    assert 0 < q8.vs_bf16.kld_mean < q4.vs_bf16.kld_mean
    assert all(len(s.decode_ms) == 2 and min(s.decode_ms) > 0 for s in sides)
    assert all(s.vs_reference.positions == 6 for s in sides)
    # the paired excess over the bf16 cache: the difference of the two means, position by position
    assert bf16.excess is None and bf16.to_dict()["excess_vs_bf16"] is None
    for q in (q4, q8):
        assert q.excess.positions == 6
        assert q.excess.mean == pytest.approx(q.vs_reference.kld_mean - bf16.vs_reference.kld_mean, abs=1e-9)
        assert q.to_dict()["excess_vs_bf16"] == q.excess.to_dict()
    # the GPU's side needs CUDA: None with the reason here, the runs kept
    assert all(s.kernels_per_step is None and "CUDA backend" in s.kernels_note for s in sides)
    assert q8.to_dict()["gpu_us_per_step"] is None and q8.to_dict()["kernels_note"] == q8.kernels_note
    rows = kv_quant.table_rows({PROMPT.size: sides})
    assert all(r[-1] == "-" for r in rows)
    assert rows[0][6] == "-" and "±" in rows[1][6] and len({len(r) for r in rows}) == 1
    json.dumps([s.to_dict() for s in sides])


def test_teacher_forcing_replays_the_greedy_run_bitwise(patched):
    cache, first = kv_quant.prefill(patched, PROMPT, 16)
    greedy, fed = kv_quant.decode(patched, cache, first, None, 5)
    cache2, first2 = kv_quant.prefill(patched, PROMPT, 16)
    forced, fed2 = kv_quant.decode(patched, cache2, first2, fed, 5)
    assert fed2 == fed
    assert all(mx.array_equal(a, b).item() for a, b in zip(greedy, forced, strict=True))


@pytest.mark.parametrize("chunk", [7, 16, 39, 100])
def test_prefill_feeds_every_prompt_token_once(patched, chunk):
    """Chunks of the prompt but its last token, then the last token: the cache holds the
    whole prompt, and a chunk as long as the prompt is one call then the last token."""
    from mlx_lm.models.cache import make_prompt_cache

    cache, first = kv_quant.prefill(patched, PROMPT, chunk)
    assert all(c.offset == PROMPT.size for c in cache)
    if chunk >= PROMPT.size - 1:
        manual = make_prompt_cache(patched)
        patched(PROMPT[None, :-1], cache=manual)
        want = patched(PROMPT[None, -1:], cache=manual)[0, -1].astype(mx.float32)
        assert mx.array_equal(first, want).item()


def test_a_quantized_copy_leaves_the_cache_as_it_was(patched):
    cache, _ = kv_quant.prefill(patched, PROMPT, 16)
    before = [type(c) for c in cache]
    copy = kv_quant.quantized_copy(cache, 8, 64)
    assert [type(c) for c in cache] == before
    assert all(type(c).__name__ == "QuantizedKVCache" for c in copy)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bits", "3"], "--kv-bits 3 is not supported"),
        (["--patterns", "moe_router"], "must include mla_kv_quant"),
        (["--contexts", "x"], "--contexts"),
        (["--tokens", "0"], "--tokens"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    spec = "synth:glm4_moe_lite/tiny/affine4"
    cmd = [sys.executable, str(SCRIPT), spec, "--capsule-dir", str(tmp_path), *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and message in p.stderr
    assert not list(tmp_path.iterdir())


def test_the_command_writes_a_capsule_with_the_seed_and_the_excess(tmp_path):
    spec = "synth:glm4_moe_lite/tiny/affine4"
    args = ["--contexts", "40", "--bits", "8", "--tokens", "3", "--repeats", "1", "--timing-steps", "1"]
    cmd = [sys.executable, str(SCRIPT), spec, "--capsule-dir", str(tmp_path), *args, "--seed", "3"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    (path,) = tmp_path.glob("*.json")
    cap = json.loads(path.read_text())
    assert cap["params"]["seed"] == 3
    bf16, q8 = cap["variants"]
    assert bf16["excess_vs_bf16"] is None and q8["excess_vs_bf16"]["positions"] == 3
    assert "KLD - bf16's" in p.stdout
