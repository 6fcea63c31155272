"""Every CUDA body compiles with NVRTC as MLX would build it (no GPU: compile only).

Runs where `python -m zmlx.kernels.cuda_setup` has fetched NVRTC and MLX's CUDA headers (CI
does, and `--require-toolchains` turns the skip into a failure there). The `cuda` tests
check the numbers on the GPU."""

import dataclasses
import re

import mlx.core as mx
import pytest
from toolchain_marks import needs_nvrtc

from zmlx.kernels import cuda_check, cuda_setup, quant
from zmlx.kernels.core import Launch
from zmlx.kernels.downproj_combine import downproj_combine
from zmlx.kernels.glm47_rope import glm47_rope
from zmlx.kernels.mla_attention import mla_decode, mla_embed_q, mla_unembed
from zmlx.kernels.mla_decode_len import mla_decode_len
from zmlx.kernels.mla_decode_q import inputs as mla_decode_q_inputs
from zmlx.kernels.mla_decode_q import mla_decode_q
from zmlx.kernels.mla_q_prep import inputs as mla_q_prep_inputs
from zmlx.kernels.mla_q_prep import kwargs as mla_q_prep_kwargs
from zmlx.kernels.mla_q_prep import mla_q_prep, mla_q_prep_nope
from zmlx.kernels.moe_combine import moe_combine
from zmlx.kernels.moe_down import moe_down
from zmlx.kernels.moe_gate_up import moe_gate_up, moe_gate_up_route
from zmlx.kernels.moe_mlp import moe_mlp, quantized_experts
from zmlx.kernels.moe_router import moe_router
from zmlx.kernels.norm_qkv_a import inputs as norm_qkv_a_inputs
from zmlx.kernels.norm_qkv_a import norm_qkv_a
from zmlx.kernels.norm_router import inputs as norm_router_inputs
from zmlx.kernels.norm_router import norm_router, norm_router_gates
from zmlx.kernels.qk_norm_rope import inputs as qk_norm_rope_inputs
from zmlx.kernels.qk_norm_rope import qk_norm_rope
from zmlx.kernels.residual_norm import residual_norm
from zmlx.kernels.softmax_router import softmax_router
from zmlx.kernels.swiglu_mlp import quantized_linear, swiglu_mlp


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
        pb = mx.zeros((6, 40), dtype)  # gpt-oss: the projections' biases and SwigluOAI
        yield moe_mlp, (x, inds, *e, *e, pb, pb), dict(kw, oai=(1.702, 7.0))
        h = mx.zeros((1, 1, 4, 256), dtype)
        d = quantized_experts(6, 7, 256, dtype=dtype, seed=2, **kw)  # odd width: the lane-tree sum
        yield downproj_combine, (h, inds, mx.zeros((1, 1, 4)), *d, mx.zeros((1, 1, 7), dtype)), kw
        # a softmax router's scores, in the activations' dtype: products and sum in it
        yield downproj_combine, (h, inds, mx.zeros((1, 1, 4), dtype), *d, mx.zeros((1, 1, 7), dtype)), kw
        g = quantized_linear(40, 384, dtype=dtype, seed=3, **kw)  # 384: a remainder tile
        yield swiglu_mlp, (mx.zeros((1, 1, 384), dtype), *g, *g), kw
        yield from _block_cases(dtype, bits)


def _block_cases(dtype, bits):  # moe_gate_up and moe_down: the shared/dense weights packed otherwise
    sbits = {4: 8, 8: None, None: 4}[bits]  # shared 8-bit, unquantized, 4-bit
    kw = dict(group_size=64, bits=bits, shared_group_size=sbits and 128, shared_bits=sbits)
    x, inds, res = mx.zeros((1, 1, 384), dtype), mx.zeros((1, 1, 4), mx.uint32), mx.zeros((1, 1, 7), dtype)
    e = quantized_experts(6, 40, 384, dtype=dtype, seed=1, group_size=64, bits=bits)  # 384: a remainder tile
    s = quantized_linear(24, 384, dtype=dtype, seed=2, group_size=sbits and 128, bits=sbits)
    yield moe_gate_up, (x, inds, *e, *e, *s, *s), kw
    route = dict(top_k=4, routed_scaling_factor=1.8, norm_topk_prob=True, renorm_eps=1e-20)  # 6 experts
    yield moe_gate_up_route, (x, mx.zeros((1, 1, 6), dtype), *e, *e, *s, *s, mx.zeros((6,))), {**kw, **route}
    d = quantized_experts(6, 7, 256, dtype=dtype, seed=3, group_size=64, bits=bits)  # odd D: lane-tree sum
    sd = quantized_linear(7, 384, dtype=dtype, seed=4, group_size=sbits and 128, bits=sbits)
    h, hs = mx.zeros((1, 1, 4, 256), dtype), mx.zeros((1, 1, 384), dtype)
    yield moe_down, (h, inds, mx.zeros((1, 1, 4)), *d, res, hs, *sd), kw
    yield moe_down, (h, inds, mx.zeros((1, 1, 4)), *d, res), kw  # no shared expert
    yield moe_down, (h, inds, mx.zeros((1, 1, 4), dtype), *d, res), kw  # scores in T (softmax routers)
    ebias = mx.zeros((6, 7), dtype)  # gpt-oss's experts' biases
    yield moe_down, (h, inds, mx.zeros((1, 1, 4), dtype), *d, res, None, None, None, None, ebias), kw
    dense = (a if a is None else a[0] for a in e)  # one (40, 384) matrix
    yield moe_down, (x, None, None, *dense, mx.zeros((1, 1, 40), dtype)), kw  # the dense layer's down


def _mxfp4_cases():  # mxfp4 experts (uint8 scales, no biases), alone and beside other packings
    mxfp4, q8 = dict(group_size=32, bits=4, mode="mxfp4"), dict(group_size=32, bits=8)
    shared = lambda p: {f"shared_{k}": v for k, v in p.items()}  # noqa: E731
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        x, inds, scores = mx.zeros((1, 1, 544), dtype), mx.zeros((1, 1, 4), mx.uint32), mx.zeros((1, 1, 4))
        e = quantized_experts(6, 9, 544, dtype=dtype, seed=1, **mxfp4)  # 544: a full tile and a remainder
        yield moe_mlp, (x, inds, *e, *e), mxfp4
        pb = mx.zeros((6, 9), dtype)  # gpt-oss's experts: mxfp4, biases, SwigluOAI
        yield moe_mlp, (x, inds, *e, *e, pb, pb), dict(mxfp4, oai=(1.702, 7.0))
        g = quantized_linear(7, 288, dtype=dtype, seed=2, **mxfp4)  # 288: a remainder tile only
        yield swiglu_mlp, (mx.zeros((1, 1, 288), dtype), *g, *g), mxfp4
        s8 = quantized_linear(13, 544, dtype=dtype, seed=3, **q8)
        yield moe_gate_up, (x, inds, *e, *e, *s8, *s8), {**mxfp4, **shared(q8)}
        e8 = quantized_experts(6, 9, 544, dtype=dtype, seed=4, **q8)
        smx = quantized_linear(13, 544, dtype=dtype, seed=5, **mxfp4)
        yield moe_gate_up, (x, inds, *e8, *e8, *smx, *smx), {**q8, **shared(mxfp4)}
        h, hs, res = mx.zeros((1, 1, 4, 288), dtype), mx.zeros((1, 1, 544), dtype), mx.zeros((1, 1, 7), dtype)
        d = quantized_experts(6, 7, 288, dtype=dtype, seed=6, **mxfp4)  # odd D: the lane-tree sum
        yield downproj_combine, (h, inds, scores, *d, res), mxfp4
        sd = quantized_linear(7, 544, dtype=dtype, seed=7, **mxfp4)
        yield moe_down, (h, inds, scores, *d, res, hs, *sd), {**mxfp4, **shared(mxfp4)}
        yield moe_down, (h, inds, scores, *d, res), mxfp4  # no shared expert
        yield moe_down, (hs, None, None, *sd, res), mxfp4  # the dense layer's down


def _cases():
    for k in (
        moe_router,
        moe_combine,
        residual_norm,
        moe_mlp,
        downproj_combine,
        swiglu_mlp,
        moe_gate_up,
        moe_gate_up_route,
        norm_router_gates,
        moe_down,
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
    for dtype in (mx.bfloat16, mx.float16, mx.float32):  # YaRN's rope: mscale 1 + 0.1 ln 32 scales the input
        (q, kv, t, pos), kw = glm47_rope.example()
        yield glm47_rope, (q.astype(dtype), kv.astype(dtype), t, pos), dict(kw, mscale=1.3465735902799727)
    yield moe_combine, (mx.zeros((2, 4, 123), mx.float16), mx.zeros((2, 4)), None), {}  # tree order
    # scores in the activations' dtype (softmax routers): products and the sum in it, both orders
    for d in (2048, 123):
        y, x = mx.zeros((2, 4, d), mx.bfloat16), mx.zeros((2, d), mx.bfloat16)
        yield moe_combine, (y, mx.zeros((2, 4), mx.bfloat16), x), {}
    yield from _quantized_cases()
    yield from _mxfp4_cases()
    yield from _mla_cases()
    yield from _mla_decode_q_cases()
    yield from _norm_router_cases()
    yield from _group_router_cases()
    yield from _mla_q_prep_cases()
    yield from _norm_qkv_a_cases()
    yield from _softmax_router_cases()
    yield from _qk_norm_rope_cases()


def _qk_norm_rope_cases():  # Qwen3-MoE's heads (32 over 4 of 128) and odd ones, every dtype
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        for b, h, hk, d in ((1, 32, 4, 128), (1, 5, 3, 64), (1, 3, 1, 6), (2, 7, 7, 256)):
            args, kw = qk_norm_rope_inputs(b, h, hk, d, dtype, 1)
            yield qk_norm_rope, args, kw
        # GLM-4.5(-Air): the projections' biases, no q/k norms or both, half of each head rotated
        for norm in (False, True):
            args, kw = qk_norm_rope_inputs(1, 96, 8, 128, dtype, 1, norm=norm, bias=True, rope_dims=64)
            yield qk_norm_rope, args, kw


def _softmax_router_cases():  # Qwen3-MoE (128 experts, top-8, renormalized) and Mixtral (top-2 of 8); odd
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        for e, k, first, norm in (
            (128, 8, True, True),
            (60, 4, True, False),
            (8, 2, False, False),
            (7, 3, False, False),
        ):
            kw = dict(top_k=k, softmax_first=first, norm_topk_prob=norm)
            yield softmax_router, (mx.zeros((1, 1, e), dtype),), kw
        for e, k in ((32, 4), (128, 4), (7, 3)):  # gpt-oss-20b, -120b, odd: the last k of the sort
            kw = dict(top_k=k, softmax_first=False, topk_last=True)
            yield softmax_router, (mx.zeros((1, 1, e), dtype),), kw
    yield (softmax_router, *softmax_router.example())  # the self-check's


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
        # the static cache's whole buffers and a device length (bf16: the tensor-core path)
        n_valid = mx.array([300], mx.int32)
        full = (mx.zeros((1, 1, 512, 512), dtype), mx.zeros((1, 1, 512, 64), dtype))
        yield mla_decode_len, (qv, q_pe, *full, n_valid), dict(scale=0.0625)
        o, m = mx.zeros((1, 5, 20, 512)), mx.zeros((1, 5, 20))
        yield (
            mla_unembed,
            (o, m, m, *quantized_experts(20, 256, 512, dtype=dtype, seed=2, **kw)),
            dict(dtype=dtype, **kw),
        )


def _mla_decode_q_cases():  # GLM-4.7-Flash's latent over a quantized cache; odd heads and a narrow latent
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        for bits, group_size in ((4, 64), (4, 32), (8, 64), (8, 32)):
            glm = mla_decode_q_inputs(1, 20, 512, 64, 300, dtype, group_size=group_size, bits=bits)
            yield mla_decode_q, *glm
        yield mla_decode_q, *mla_decode_q_inputs(2, 5, 128, 32, 40, dtype, group_size=32, bits=4)
    yield (mla_decode_q, *mla_decode_q.example())  # the self-check's


def _norm_router_cases():  # GLM-4.7-Flash's width, and odd ones (2 and 1 values per lane in the gemv)
    kw = dict(eps=1e-5, top_k=4, routed_scaling_factor=1.8, norm_topk_prob=True, renorm_eps=1e-20)
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        for d, e in ((2048, 64), (320, 40), (200, 7)):
            yield norm_router, norm_router_inputs((1, 1), d, e, dtype, 1), kw
            yield norm_router_gates, norm_router_inputs((1, 1), d, e, dtype, 1)[:4], dict(eps=1e-5)


def _group_router_cases():  # DeepSeek-V3's group-limited routing (8 groups, 4 kept), and odd groupings
    ds = dict(routed_scaling_factor=2.5, norm_topk_prob=True, renorm_eps=None)
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        for e, k, ng, tg in ((256, 8, 8, 4), (64, 8, 8, 4), (24, 3, 4, 2)):
            kw = dict(ds, top_k=k, n_group=ng, topk_group=tg)
            yield moe_router, (mx.zeros((1, e), dtype), mx.zeros((e,))), kw
            yield norm_router, norm_router_inputs((1, 1), 320, e, dtype, 1), dict(kw, eps=1e-6)
            # moe_gate_up_route routes the same way (top-4 at most: CUDA's qmv takes < 8 expert rows)
            q4 = dict(group_size=64, bits=4)
            ex = quantized_experts(e, 9, 256, dtype=dtype, seed=1, **q4)
            s = quantized_linear(11, 256, dtype=dtype, seed=2, **q4)
            x, gates = mx.zeros((1, 1, 256), dtype), mx.zeros((1, 1, e), dtype)
            route = dict(kw, **q4, top_k=min(k, 4), shared_group_size=64, shared_bits=4)
            yield moe_gate_up_route, (x, gates, *ex, *ex, *s, *s, mx.zeros((e,))), route


def _norm_qkv_a_cases():  # GLM-4.7-Flash's rows, and odd ones: q_a and kv_a packed differently or unquantized
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        for d, rq, rkv, q, kv in (
            (2048, 768, 576, (64, 4), (64, 4)),
            (320, 40, 21, (64, 4), (32, 8)),  # a remainder tile
            (384, 13, 9, (128, 8), (None, None)),
            (200, 39, 5, (None, None), (None, None)),  # gemv, 1 value per lane
        ):
            args, kw = norm_qkv_a_inputs(
                (1, 1), d, rq, rkv, dtype, 1, group_size=q[0], bits=q[1], kv_group_size=kv[0], kv_bits=kv[1]
            )
            yield norm_qkv_a, args, kw


def _mla_q_prep_cases():  # GLM-4.7-Flash's attention and small odd shapes; mixed packings
    from zmlx.kernels.glm47_rope import rope_table

    q4, q8 = dict(group_size=64, bits=4), dict(group_size=32, bits=8)
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        for shape, qp, ep in (
            ((20, 768, 192, 64, 512), q4, q4),
            ((20, 768, 192, 64, 512), q8, None),
            ((3, 96, 32, 16, 64), None, q8),  # odd shapes, unquantized q_b_proj
            ((1, 200, 16, 8, 40), None, None),  # 1 value per lane in the gemv
        ):
            heads, qlr, nope, rd, rank = shape
            args = mla_q_prep_inputs(1, heads, qlr, nope, rd, rank, dtype, 1, packing=qp, embed_packing=ep)
            kw = mla_q_prep_kwargs(heads, nope, rd, packing=qp, embed_packing=ep)
            yield mla_q_prep, (*args, rope_table(rd, 10_000.0, 1.0, 8), 5), kw
            nope_kw = {k: v for k, v in kw.items() if not k.startswith("embed_")}
            yield mla_q_prep_nope, (*args[:7], rope_table(rd, 10_000.0, 1.0, 8), 5), nope_kw
            if qp is q4:  # YaRN's rope: its frequencies in the table, mscale 1 + 0.1 ln 32 on the input
                freqs = mx.arange(1, rd // 2 + 1, dtype=mx.float32)
                yarn = dict(kw, base=None, freqs=freqs, mscale=1.3465735902799727)
                yield mla_q_prep, (*args, rope_table(rd, None, 1.0, 8, freqs=freqs), 5), yarn
                nope_yarn = {k: v for k, v in yarn.items() if not k.startswith("embed_")}
                yield mla_q_prep_nope, (*args[:7], rope_table(rd, None, 1.0, 8, freqs=freqs), 5), nope_yarn
    args, kw = mla_q_prep.example()  # the self-check's
    yield mla_q_prep, args, kw
    yield mla_q_prep_nope, *mla_q_prep_nope.example()


CASES = list(_cases())


@needs_nvrtc
@pytest.mark.parametrize("case", CASES, ids=[f"{k.name}-{i}" for i, (k, _, _) in enumerate(CASES)])
def test_cuda_body_compiles(case, monkeypatch):
    kernel, args, kw = case
    # wide gathered mxfp4 rows take the reference on CUDA for now (quant.MXFP4_GATHERED_MAX_COLS);
    # their body still compiles, for the day stock's order there is known
    monkeypatch.setattr(quant, "MXFP4_GATHERED_MAX_COLS", 1 << 30)
    spec = kernel.launch("cuda", *args, **kw)
    assert isinstance(spec, Launch), spec
    cuda_check.compile_launch(kernel, spec)


@needs_nvrtc
@pytest.mark.parametrize("i", range(len(list(_mxfp4_cases()))))
def test_cuda_fp_order_bodies_compile(i, monkeypatch):
    """The mxfp4 cases with quant.MXFP4_FP_ORDER on: the wide gathered rows' bodies in
    fp_qmv's order (FPQMV) compile too."""
    monkeypatch.setattr(quant, "MXFP4_FP_ORDER", True)
    kernel, args, kw = list(_mxfp4_cases())[i]
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
