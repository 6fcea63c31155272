"""Every CUDA body compiles with NVRTC as MLX would build it (no GPU: compile only).

Runs where `python -m zmlx.kernels.cuda_setup` has fetched NVRTC and MLX's CUDA headers (CI
does, and `--require-toolchains` turns the skip into a failure there). The `cuda` tests
check the numbers on the GPU."""

import dataclasses
import re

import mlx.core as mx
import pytest

from zmlx.kernels import cuda_check, cuda_setup
from zmlx.kernels.core import Launch
from zmlx.kernels.downproj_combine import downproj_combine
from zmlx.kernels.glm47_rope import glm47_rope
from zmlx.kernels.mla_attention import mla_decode, mla_embed_q, mla_unembed
from zmlx.kernels.moe_combine import moe_combine
from zmlx.kernels.moe_mlp import moe_mlp, quantized_experts
from zmlx.kernels.moe_router import moe_router
from zmlx.kernels.residual_norm import residual_norm
from zmlx.kernels.swiglu_mlp import quantized_linear, swiglu_mlp

needs_nvrtc = pytest.mark.skipif(
    not cuda_check.available(),
    reason=f"needs NVRTC and MLX's CUDA headers: {cuda_check.SETUP}"
    if cuda_check.supported()
    else cuda_check.UNSUPPORTED,
)


def _quantized_cases():  # and unquantized (bits None)
    for dtype, bits in (
        (mx.bfloat16, 4),
        (mx.float16, 8),
        (mx.float32, 4),
        (mx.float32, 8),
        (mx.bfloat16, None),
        (mx.float32, None),
    ):
        kw = dict(group_size=64, bits=bits)
        x = mx.zeros((1, 1, 256), dtype)
        inds = mx.zeros((1, 1, 4), mx.uint32)
        e = quantized_experts(6, 40, 256, dtype=dtype, seed=1, **kw)
        yield moe_mlp, (x, inds, *e, *e), kw
        h = mx.zeros((1, 1, 4, 256), dtype)
        d = quantized_experts(6, 7, 256, dtype=dtype, seed=2, **kw)  # odd width: the lane-tree sum
        yield downproj_combine, (h, inds, mx.zeros((1, 1, 4)), *d, mx.zeros((1, 1, 7), dtype)), kw
        g = quantized_linear(40, 384, dtype=dtype, seed=3, **kw)  # 384: a remainder tile
        yield swiglu_mlp, (mx.zeros((1, 1, 384), dtype), *g, *g), kw


def _cases():
    for k in (
        moe_router,
        moe_combine,
        residual_norm,
        moe_mlp,
        downproj_combine,
        swiglu_mlp,
        glm47_rope,
        mla_embed_q,
        mla_decode,
        mla_unembed,
    ):
        args, kw = k.example()
        yield k, args, kw
    for dtype in (mx.float16, mx.float32):
        (q, kv, t, pos), kw = glm47_rope.example()
        yield glm47_rope, (q.astype(dtype), kv.astype(dtype), t, pos), kw
    yield moe_combine, (mx.zeros((2, 4, 123), mx.float16), mx.zeros((2, 4)), None), {}  # tree order
    yield from _quantized_cases()
    yield from _mla_cases()


def _mla_cases():  # GLM-4.7-Flash's attention: 20 heads, nope 192, rope 64, latent 512, v 256
    for dtype, bits in ((mx.bfloat16, 8), (mx.float16, 4), (mx.float32, None)):
        kw = dict(group_size=64 if bits else None, bits=bits)
        q = mx.zeros((1, 1, 20 * 256), dtype)
        yield (
            mla_embed_q,
            (q, *quantized_experts(20, 512, 192, dtype=dtype, seed=1, **kw)),
            dict(heads=20, head_dim=256, nope=192, **kw),
        )
        lat, kpe = mx.zeros((1, 1, 512, 512), dtype)[:, :, :300], mx.zeros((1, 1, 512, 64), dtype)[:, :, :300]
        qv, q_pe = mx.zeros((1, 20, 512)), mx.zeros((1, 20, 1, 64), dtype)
        yield mla_decode, (qv, q_pe, lat, kpe), dict(scale=0.0625)
        o, m = mx.zeros((1, 5, 20, 512)), mx.zeros((1, 5, 20))
        yield (
            mla_unembed,
            (o, m, m, *quantized_experts(20, 256, 512, dtype=dtype, seed=2, **kw)),
            dict(dtype=dtype, **kw),
        )


CASES = list(_cases())


@needs_nvrtc
@pytest.mark.parametrize("case", CASES, ids=[f"{k.name}-{i}" for i, (k, _, _) in enumerate(CASES)])
def test_cuda_body_compiles(case):
    kernel, args, kw = case
    spec = kernel.launch("cuda", *args, **kw)
    assert isinstance(spec, Launch), spec
    cuda_check.compile_launch(kernel, spec)


@needs_nvrtc
def test_a_broken_body_is_reported_with_nvrtc_errors():
    assert "sum.total()" in moe_combine.body
    broken = dataclasses.replace(moe_combine, body=moe_combine.body.replace("sum.total()", "sum.totl()"))
    args, kw = moe_combine.example()
    with pytest.raises(cuda_check.CudaCompileError) as e:
        cuda_check.compile_launch(broken, moe_combine.launch("cuda", *args, **kw))
    # NVRTC's own diagnostic, with the line in the generated source: not a message of ours
    assert re.search(r'moe_combine\.cu\(\d+\): error: .*has no member "totl"', str(e.value)), str(e.value)


def test_setup_refuses_a_library_without_mlx_device_headers():
    with pytest.raises(cuda_setup.SetupError, match="not a 64-bit"):
        cuda_setup.embedded_headers(b"not a library")
    elf = b"\x7fELF\x02\x01" + bytes(58)  # an ELF header with no segments, sections or relocations
    with pytest.raises(cuda_setup.SetupError, match="no array of MLX's device header names"):
        cuda_setup.embedded_headers(elf)
