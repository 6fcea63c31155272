"""mla_prologue's compiled tail: where the second launch is mla_q_prep_embed and a step has no
mask, the rope scores, MLX's attention fallback, unembed_out and the heads' merge run as one function
compiled once (shapeless) for the layer, so MLX replays them instead of Python building them
each step (o_proj after it, eagerly). On the CPU every step stays bitwise stock; it is traced
once per layer however the cache grows; and a layer whose unembed_out arrays change since is
prepared again."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from block_helpers import same

import zmlx
from zmlx.fidelity import greedy_logits
from zmlx.patch.patterns import mla_prologue

PROMPT = mx.array([[3, 14, 15, 92, 65, 35, 89]])


pytestmark = pytest.mark.usefixtures("embedded_prologues", "compiled_tail")


@pytest.fixture
def compiled_tail(monkeypatch):
    """mla_prologue.COMPILE_TAIL on (off by default since its first ledger line: NOTEBOOK)."""
    monkeypatch.setattr(mla_prologue, "COMPILE_TAIL", True)


@pytest.fixture
def traces(monkeypatch):
    """How many times the tail's Python ran (once a trace: a replay runs none of it)."""
    calls = [0]
    inner = mla_prologue._attention_after_scale

    def counted(*a):
        calls[0] += 1
        return inner(*a)

    monkeypatch.setattr(mla_prologue, "_attention_after_scale", counted)
    return calls


def _patched(model, prompt, steps):
    zmlx.patch(model, patterns=["mla_prologue"])
    try:
        return greedy_logits(model, prompt, steps)
    finally:
        zmlx.unpatch(model)


def test_each_layer_traces_its_tail_once_as_the_cache_grows(tiny_q4, no_stock_attention, traces):
    model, _ = tiny_q4
    stock = greedy_logits(model, PROMPT, 6)
    patched = _patched(model, PROMPT, 6)
    assert same(stock, patched)
    assert traces[0] == model.args.num_hidden_layers  # five decode steps, one trace a layer


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_the_compiled_tail_is_the_eager_ops_bitwise_at_every_length(tiny_q4, dtype):
    """The compiled function against the same ops run eagerly (mlx-lm's reshape for the heads'
    merge), over cache lengths 1, 17 and 64 with one trace."""
    model, _ = tiny_q4
    attn = model.model.layers[1].self_attn
    tail = mla_prologue._compiled_tail(attn.unembed_out)
    h, rank, rope = attn.num_heads, attn.kv_lora_rank, attn.qk_rope_head_dim
    for length in (1, 17, 64):
        ks = mx.random.split(mx.random.key(length), 4)
        q = mx.random.normal((1, h, 1, rank), key=ks[0]).astype(dtype)
        q_pe = mx.random.normal((1, h, 1, rope), key=ks[1]).astype(dtype)
        kv = mx.random.normal((1, 1, length, rank), key=ks[2]).astype(dtype)
        k_pe = mx.random.normal((1, 1, length, rope), key=ks[3]).astype(dtype)
        eager = mla_prologue._attention_after_scale(q, kv, q_pe @ k_pe.swapaxes(-1, -2))
        eager = attn.o_proj(attn.unembed_out(eager).transpose(0, 2, 1, 3).reshape(1, 1, -1))
        got = attn.o_proj(tail(q, q_pe, kv, k_pe))
        assert got.shape == eager.shape and got.dtype == eager.dtype
        assert mx.array_equal(got, eager).item(), length


class _Doubled(nn.Module):
    """A module put in o_proj's place (as LoRA wraps it): the original's output times two."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __call__(self, x):
        return self.inner(x) * 2


def test_a_replaced_o_proj_module_or_unembed_out_arrays_are_used(tiny_q4, no_stock_attention):
    """o_proj runs outside the compiled tail (a wrapper put in its place runs); the tail holds
    unembed_out, so new arrays there prepare the block again."""
    model, _ = tiny_q4
    attn = model.model.layers[1].self_attn
    original, unembed = attn.o_proj, attn.unembed_out
    biases = unembed["biases"]

    def decode(wrapped: bool, shifted: bool):
        attn.o_proj = _Doubled(original) if wrapped else original
        unembed["biases"] = biases + 0.25 if shifted else biases
        try:
            return greedy_logits(model, PROMPT, 3)
        finally:
            attn.o_proj, unembed["biases"] = original, biases

    zmlx.patch(model, patterns=["mla_prologue"])
    try:
        decode(False, False)  # the blocks are prepared with the original arrays
        wrapped, shifted = decode(True, False), decode(False, True)
    finally:
        zmlx.unpatch(model)
    want_wrapped, want_shifted = decode(True, False), decode(False, True)
    assert same(want_wrapped, wrapped) and same(want_shifted, shifted)
    assert not mx.array_equal(want_wrapped[-1], want_shifted[-1]).item()
