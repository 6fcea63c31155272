"""norm_qkv_a: input_layernorm + q_a_proj (or q_proj) + kv_a_proj_with_mqa in one launch.

CPU: the reference (fed by `attention_args`) is mlx-lm's own modules (a glm4_moe_lite
decoder layer's input_layernorm and its attention's projections, 4/8-bit and unquantized,
packed differently), not a copy of itself. The Metal body through the emulation: as close to
a float32 truth as stock is. `cuda` tests: bitwise stock on the GPU, outputs poisoned."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import glm4_moe_lite

from zmlx.kernels import metal_emu
from zmlx.kernels.core import Launch
from zmlx.kernels.norm_qkv_a import (
    attention_args,
    attention_reason,
    inputs,
    launch,
    norm_qkv_a,
    reference,
    reference_f32,
)

DTYPES = [mx.bfloat16, mx.float16, mx.float32]
Q4, Q8, DENSE = (64, 4), (32, 8), (None, None)

# (tokens shape, D, q_lora_rank (None: q_proj of heads x (nope + rope)), heads, nope, rope,
#  kv_lora_rank, q packing, kv packing)
LAYERS = [
    ((1, 1), 2048, 768, 20, 192, 64, 512, Q4, Q4),  # GLM-4.7-Flash (affine 4-bit)
    ((1, 1), 320, 40, 2, 8, 4, 17, Q4, Q8),  # odd width: a remainder tile; packed otherwise
    ((1, 1), 384, 13, 3, 6, 4, 5, (128, 8), DENSE),  # kv_a unquantized
    ((1,), 256, 24, 2, 8, 6, 11, DENSE, (64, 4)),  # q_a unquantized: gemv, 4 values per lane
    ((1, 1), 192, None, 3, 9, 4, 5, DENSE, DENSE),  # q_proj (no q LoRA), 39 rows; 2 per lane
    ((1,), 200, 9, 2, 4, 2, 9, DENSE, DENSE),  # 1 value per lane
    ((1,), 256, None, 5, 5, 2, 7, (128, 4), Q8),  # q_proj quantized
]


def _pack(p):
    return dict(group_size=p[0], bits=p[1])


def _layer(d, q_lora_rank, heads, nope, rope, kv_lora_rank, qp, kvp, dtype, seed, *, bias=False, mode=None):
    """A glm4_moe_lite decoder layer with random weights, its q/kv projections quantized as asked."""
    args = glm4_moe_lite.ModelArgs(
        hidden_size=d,
        intermediate_size=32,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=rope,
        qk_nope_head_dim=nope,
        v_head_dim=8,
        attention_bias=bias,
        rms_norm_eps=1e-5,
    )
    mx.random.seed(seed)
    layer = glm4_moe_lite.Glm4MoeLiteDecoderLayer(args, 0)
    layer.input_layernorm.weight = 1 + 0.1 * mx.random.normal((d,))
    layer.set_dtype(dtype)
    packs = {"q_a_proj": qp, "q_proj": qp, "kv_a_proj_with_mqa": kvp}

    def predicate(path, m):
        name = path.split(".")[-1]
        if mode is not None and name in packs:
            return dict(group_size=32, bits=4, mode=mode)
        p = packs.get(name, DENSE)
        return p[1] is not None and isinstance(m, nn.Linear) and _pack(p)

    nn.quantize(layer, class_predicate=predicate)
    return layer


def _stock(layer, x):
    """mlx-lm's modules: input_layernorm, then the attention's q_a (or q) and kv_a projections."""
    attn = layer.self_attn
    xn = layer.input_layernorm(x)
    q = attn.q_proj(xn) if attn.q_lora_rank is None else attn.q_a_proj(xn)
    return q, attn.kv_a_proj_with_mqa(xn)


def _case(case, dtype, seed):
    lead, d, *shape = case
    layer = _layer(d, *shape, dtype, seed)
    x = mx.random.normal((*lead, d), key=mx.random.key(seed)).astype(dtype)
    args, kw = attention_args(layer.input_layernorm, layer.self_attn)
    return layer, (x, *args), kw


@pytest.mark.parametrize("case", LAYERS + [((2, 3), 320, 40, 2, 8, 4, 17, Q4, Q8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_mlx_lm_modules(case, dtype):
    layer, args, kw = _case(case, dtype, case[1])
    assert attention_reason(layer.self_attn) is None
    got, want = reference(*args, **kw), _stock(layer, args[0])
    assert [a.dtype for a in got] == [dtype, dtype]
    assert all(a.shape == b.shape and mx.array_equal(a, b).item() for a, b in zip(got, want))


def test_attention_args_read_each_projections_packing():
    layer, args, kw = _case(LAYERS[1], mx.bfloat16, 1)
    assert kw == dict(eps=1e-5, group_size=64, bits=4, kv_group_size=32, kv_bits=8)
    assert args[1] is layer.input_layernorm.weight and args[2] is layer.self_attn.q_a_proj.weight
    _, args, kw = _case(LAYERS[4], mx.bfloat16, 1)  # q_proj, unquantized: no scales or biases
    assert args[2].shape == (39, 192) and args[3] is None and args[4] is None and kw["bits"] is None


def test_attention_reason_names_what_the_kernel_cannot_read():
    for qp in (Q4, DENSE):
        biased = _layer(256, 24, 2, 8, 6, 11, qp, qp, mx.bfloat16, 2, bias=True)  # attention_bias
        assert "q_a_proj has a bias" in attention_reason(biased.self_attn)
    mxfp4 = _layer(256, 24, 2, 8, 6, 11, Q4, Q4, mx.bfloat16, 2, mode="mxfp4")
    assert "mxfp4" in attention_reason(mxfp4.self_attn)
    no_lora = _layer(256, None, 2, 8, 6, 11, Q4, Q4, mx.bfloat16, 2, bias=True)  # q_proj has none
    assert "kv_a_proj_with_mqa has a bias" in attention_reason(no_lora.self_attn)


def test_launch_says_why_it_takes_the_reference():
    args, kw = norm_qkv_a.example()
    x, norm_w, qw, qs, qb, kw_, ks, kb = args
    assert launch("cuda", *args, **kw).grid == (8 * 256, 1, 1)  # 61 rows: 8 groups of 8 warps
    assert "one float dtype" in launch("cuda", x, norm_w.astype(mx.float32), *args[2:], **kw).reason
    assert "one float dtype" in launch("cuda", x.astype(mx.int32), *args[1:], **kw).reason
    assert "shapes" in launch("cuda", x, norm_w[:64], *args[2:], **kw).reason
    assert "empty" in launch("cuda", x[:, :0], *args[1:], **kw).reason
    assert launch("cuda", *args, **{**kw, "bits": 3}).reason.startswith("q_a: affine 3-bit")
    assert launch("cuda", *args, **{**kw, "kv_bits": 2}).reason.startswith("kv_a: affine 2-bit")
    assert "kv_a: affine quantization without biases" == launch("cuda", *args[:7], None, **kw).reason
    assert "q_a: weights" in launch("cuda", x, norm_w, qw[:, :8], *args[3:], **kw).reason
    assert "one matrix" in launch("cuda", x, norm_w, qw[None], qs[None], qb[None], *args[5:], **kw).reason
    f16 = (ks.astype(mx.float16), kb.astype(mx.float16))
    assert "kv_a: scales/biases not in the activations' dtype" in launch("cuda", *args[:6], *f16, **kw).reason
    dense_kv = mx.zeros((21, 320), mx.float32)  # unquantized, not in x's dtype
    no_pack = {**kw, "kv_group_size": None, "kv_bits": None}
    assert "kv_a: unquantized weights" in launch("cuda", *args[:5], dense_kv, None, None, **no_pack).reason
    wide, wkw = inputs((1,), 9000, 8, 8, mx.float32, 1)
    assert "threadgroup memory" in launch("cuda", *wide, **wkw).reason
    assert "4096" in launch("metal", *inputs((1,), 5120, 8, 8, mx.bfloat16, 1)[0], **wkw).reason


def test_cuda_takes_one_token_where_stock_runs_qmv_and_gemv():
    """A dense matmul leaves qmv (sm90) and gemv from 2 rows: those calls take the reference."""
    args, kw = inputs((2, 1), 320, 40, 21, mx.bfloat16, 3, **_pack(Q4), kv_group_size=32, kv_bits=8)
    assert launch("cuda", *args, **kw).reason.startswith("q_a: 2 rows: stock uses a tiled qmm")
    dense, dkw = inputs((1, 2), 320, 40, 21, mx.bfloat16, 3)
    assert launch("cuda", *dense, **dkw).reason.startswith("q_a: 2 rows: stock leaves its gemv")
    spec = launch("metal", *args, **kw)  # Metal is close anyway: every token's groups
    assert isinstance(spec, Launch) and spec.grid[0] == 2 * 8 * spec.threadgroup[0]
    assert spec.output_shapes == [(2, 1, 40), (2, 1, 21)]


def test_glm47_rows_spread_over_many_threadgroups():
    """GLM-4.7-Flash's 768 + 576 rows of 2048: one row per warp, 168 groups of 8 warps on CUDA
    (more than an H100/H200 has SMs); Metal's rms_norm needs 512 threads per group."""
    args, kw = inputs((1, 1), 2048, 768, 576, mx.bfloat16, 4, **_pack(Q4), kv_group_size=64, kv_bits=4)
    cuda, metal = launch("cuda", *args, **kw), launch("metal", *args, **kw)
    assert (cuda.grid[0] // cuda.threadgroup[0], cuda.threadgroup[0]) == (168, 256)
    assert (metal.grid[0] // metal.threadgroup[0], metal.threadgroup[0]) == (84, 512)


# (tokens shape, D, q rows, kv rows, q packing, kv packing)
EMU_CASES = [
    ((1, 1), 320, 40, 21, Q4, Q8),  # rms BLOCK 96 < 256 threads: extra warps add +0.0
    ((3,), 384, 13, 9, (128, 8), DENSE),  # several tokens; kv unquantized
    ((1,), 2048, 96, 72, Q4, (64, 4)),  # GLM's width: BLOCK 512 = the group
    ((1, 1), 200, 9, 11, DENSE, DENSE),
    ((2,), 64, 5, 3, (32, 4), (64, 8)),  # a 32-thread BLOCK
]


def _emu_inputs(case, dtype, scale):
    """The case's inputs, x times `scale` (a power of 2: exact): at 2**-10 the mean square is
    near eps, so a kernel that dropped or misplaced eps would be off by a large factor."""
    lead, d, rq, rkv, qp, kvp = case
    args, kw = inputs(lead, d, rq, rkv, dtype, d + rq, **_pack(qp), kv_group_size=kvp[0], kv_bits=kvp[1])
    return (args[0] * scale, *args[1:]), kw


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("case", EMU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 2**-10])
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, case, dtype, scale):
    args, kw = _emu_inputs(case, dtype, scale)
    got = metal_emu.run(norm_qkv_a, *args, workdir=tmp_path_factory.getbasetemp(), **kw)  # poisoned NaN
    stock, truth = reference(*args, **kw), reference_f32(*args, **kw)
    for i, name in enumerate(("q_a", "ckv")):
        assert got[i].dtype == dtype and got[i].shape == stock[i].shape, name
        want, bar = close_bar(lambda *a, **k: stock[i], lambda *a, **k: truth[i], args, kw, dtype)
        assert mx.abs(got[i].astype(mx.float32) - want).max().item() <= bar, name


@pytest.mark.cuda
@pytest.mark.parametrize("case", LAYERS + [((1,), 7168, 1536, 32, 96, 32, 512, Q4, (64, 8))])  # DeepSeek-V3's
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_is_bitwise_mlx_lm(case, dtype):
    layer, args, kw = _case(case, dtype, 3 * case[1])
    want = _stock(layer, args[0])
    got = norm_qkv_a.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    for name, a, b in zip(("q_a", "ckv"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert mx.array_equal(a, b).item(), (name, mx.abs(a.astype(mx.float32) - b).max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("case", [((1,), *c[1:]) for c in EMU_CASES])  # one token
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 2**-10])
def test_cuda_kernel_is_bitwise_the_reference(case, dtype, scale):
    args, kw = _emu_inputs(case, dtype, scale)
    got = norm_qkv_a.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    for a, b in zip(got, reference(*args, **kw)):
        assert a.dtype == b.dtype and mx.array_equal(a, b).item()


@pytest.mark.cuda
def test_cuda_kernel_is_what_runs():
    assert norm_qkv_a.plan("cuda").path == "kernel", norm_qkv_a.plan("cuda").reason
