"""residual_norm: h = x + r and mx.fast.rms_norm(h), bitwise MLX's own kernels on the GPU."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import glm4_moe_lite

from zmlx.kernels import metal_emu
from zmlx.kernels.residual_norm import geometry, launch, reference, residual_norm

SHAPES = [  # (leading shape, D)
    ((1, 1), 2048),  # GLM-4.7-Flash hidden, decode
    ((2, 13), 2048),  # prompt
    ((3,), 512),  # kv_lora_rank (the latent norm)
    ((2,), 1536),  # 192 reads of 8: MLX picks 64 threads x 3 chunks
    ((5,), 123),  # odd: a partial last read
    ((1, 3), 1000),
    ((2,), 10000),  # past 1024 reads of 8: MLX's looped kernel, 1024 threads
    ((1,), 7168),  # DeepSeek-V3 hidden
]
DTYPES = [mx.bfloat16, mx.float16, mx.float32]


def _inputs(lead, d, dtype, seed):
    x = (mx.random.normal((*lead, d), key=mx.random.key(seed)) * 4).astype(dtype)
    r = mx.random.normal((*lead, d), key=mx.random.key(seed + 1)).astype(dtype)
    w = (1 + 0.2 * mx.random.normal((d,), key=mx.random.key(seed + 2))).astype(dtype)
    return x, r, w


def stock(x, r, w, eps):
    """MLX's own RMSNorm module (what mlx-lm's layers hold), on the residual sum."""
    norm = nn.RMSNorm(w.shape[0], eps=eps)
    norm.weight = w
    h = x + r
    return h, norm(h)


@pytest.mark.parametrize("lead,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_reference_is_nn_rms_norm_of_the_sum(lead, d, dtype, eps):
    x, r, w = _inputs(lead, d, dtype, d + 1)
    got_h, got = reference(x, r, w, eps)
    want_h, want = stock(x, r, w, eps)
    assert got_h.dtype == got.dtype == want.dtype == dtype
    assert mx.array_equal(got_h, want_h).item()
    assert mx.array_equal(got, want).item()


class _Fixed(nn.Module):
    """Stands in for a sublayer: returns a fixed output (attention) or zeros (the MLP, so
    that the layer returns its residual stream h unchanged) and records what it was given."""

    def __init__(self, out=None):
        super().__init__()
        self.out, self.seen = out, []

    def __call__(self, x, *args, **kwargs):
        self.seen.append(x)
        return self.out if self.out is not None else mx.zeros_like(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1, 1), (2, 5)])
def test_reference_is_mlx_lm_decoder_layer(dtype, lead):
    """In mlx-lm's Glm4MoeLiteDecoderLayer, `h = x + r` then `post_attention_layernorm(h)`
    feeds the MLP: the reference gives both, bitwise."""
    d = 64
    args = glm4_moe_lite.ModelArgs(
        hidden_size=d,
        intermediate_size=32,
        num_attention_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        rms_norm_eps=1e-6,
    )
    layer = glm4_moe_lite.Glm4MoeLiteDecoderLayer(args, layer_idx=0)
    layer.set_dtype(dtype)
    x, r, w = _inputs(lead, d, dtype, 11)
    layer.post_attention_layernorm.weight = w
    layer.self_attn, layer.mlp = _Fixed(r), _Fixed()
    h = layer(x)  # the MLP adds zeros: h is the layer's residual stream
    got_h, got = reference(x, r, w, layer.post_attention_layernorm.eps)
    assert mx.array_equal(got_h, h).item()
    assert mx.array_equal(got, layer.mlp.seen[0]).item()


def test_geometry_is_mlx_cuda_dispatch():
    # (threads, chunks, values per read) as MLX's CUDA rms_norm picks them
    assert geometry("cuda", 2048, 2) == (128, 2, 8)
    assert geometry("cuda", 512, 2) == (64, 1, 8)
    assert geometry("cuda", 1536, 2) == (64, 3, 8)
    assert geometry("cuda", 123, 2) == (64, 1, 8)
    assert geometry("cuda", 1000, 4) == (128, 2, 4)
    assert geometry("cuda", 10000, 2) == (1024, 2, 8)
    assert geometry("cuda", 2048, 4) == (128, 4, 4)
    assert geometry("metal", 2048, 2) == (512, 1, 4)
    assert "4096" in geometry("metal", 7168, 2).reason


def test_launch_says_why_it_takes_the_reference():
    x, r, w = _inputs((1,), 64, mx.bfloat16, 2)
    assert "one float dtype" in launch("cuda", x, r, w.astype(mx.float32), 1e-5).reason
    assert "shapes" in launch("cuda", x, r[..., :32], w, 1e-5).reason
    assert isinstance(launch("cuda", x, r, w, 1e-5).template, list)


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("lead,d", SHAPES[:6])
@pytest.mark.parametrize("dtype", DTYPES)
def test_metal_body_matches_the_reference(tmp_path_factory, lead, d, dtype):
    """Through the emulation: h bitwise; the norm within one rounding of its dtype, or
    float32 summation-order error (the emulated simd_sum adds in lane order, MLX's CPU
    rms_norm in its own order)."""
    x, r, w = _inputs(lead, d, dtype, d)
    h, out = metal_emu.run(residual_norm, x, r, w, 1e-5, workdir=tmp_path_factory.getbasetemp())
    want_h, want = reference(x, r, w, 1e-5)
    assert h.dtype == out.dtype == dtype
    assert mx.array_equal(h, want_h).item()
    rtol = {mx.bfloat16: 2**-6, mx.float16: 2**-9, mx.float32: 1e-5}[dtype]
    assert mx.allclose(out.astype(mx.float32), want.astype(mx.float32), rtol=rtol, atol=0).item()


@pytest.mark.cuda
@pytest.mark.parametrize("lead,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_cuda_kernel_is_bitwise_stock(lead, d, dtype, eps):
    x, r, w = _inputs(lead, d, dtype, d * 3)
    want_h, want = stock(x, r, w, eps)
    got_h, got = residual_norm.run_kernel("cuda", x, r, w, eps, init_value=float("nan"))  # poisoned
    assert got_h.dtype == got.dtype == dtype and got.shape == want.shape
    assert mx.array_equal(got_h, want_h).item()
    assert mx.array_equal(got, want).item()


@pytest.mark.cuda
def test_cuda_kernel_is_what_runs():
    assert residual_norm.plan("cuda").path == "kernel", residual_norm.plan("cuda").reason
