"""moe_gate_up: the routed experts' and the shared expert's gate + up + SwiGLU in one launch.

On CUDA the kernel follows MLX's qmv (gemv unquantized) and compiled swiglu operation for
operation: bitwise stock wherever stock runs them (fewer than 8 expert rows, one token for the
shared expert's dense matmuls). The Metal body sums in float32 in another order (`close`):
each output is held to the float32 reference with stock's own error as the bar.

moe_gate_up_route is the same body routing each token first from the router's gates: its
reference is mlx-lm's MoEGate + SwitchGLU + shared MLP on the CPU; its Metal body routes as
moe_router's does (bitwise) and its rows are then held as moe_gate_up's; on CUDA all four
outputs are bitwise stock's."""

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import deepseek_v3, glm4_moe_lite
from mlx_lm.models.activations import swiglu
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from zmlx.kernels import metal_emu, moe_router
from zmlx.kernels.core import KernelDef, Launch
from zmlx.kernels.moe_gate_up import launch, moe_gate_up, moe_gate_up_route, reference, reference_f32
from zmlx.kernels.moe_mlp import quantized_experts
from zmlx.kernels.swiglu_mlp import quantized_linear

# (tokens shape, experts, k, rows I, shared rows Is, width D, (group, bits), shared (group, bits))
CASES = [
    ((1, 1), 8, 4, 24, 40, 256, (64, 4), (64, 4)),  # GLM-4.7-Flash's kind of call, small
    ((1, 1), 6, 2, 7, 9, 384, (128, 4), (32, 8)),  # odd rows, a remainder tile, mixed packing
    ((1,), 5, 3, 9, 33, 256, (32, 8), (128, 4)),
    ((1, 1), 4, 1, 16, 16, 128, (64, 8), (None, None)),  # quantized experts, unquantized shared
    ((1, 1), 8, 4, 24, 40, 256, (None, None), (None, None)),  # unquantized (gemv order, 4 per lane)
    ((1,), 5, 3, 9, 7, 192, (None, None), (64, 4)),  # 2 per lane
    ((3,), 5, 2, 9, 11, 256, (64, 4), (64, 8)),  # several tokens: Metal only (CUDA stock leaves qmv)
]


def _inputs(lead, experts, k, rows, srows, d, quant, squant, dtype, seed=0):
    (gs, bits), (sgs, sbits) = quant, squant
    x = mx.random.normal((*lead, d), key=mx.random.key(seed)).astype(dtype)
    inds = mx.random.randint(0, experts, (*lead, k), key=mx.random.key(seed + 1)).astype(mx.uint32)
    g = quantized_experts(experts, rows, d, group_size=gs, bits=bits, dtype=dtype, seed=seed + 2)
    u = quantized_experts(experts, rows, d, group_size=gs, bits=bits, dtype=dtype, seed=seed + 3)
    sg = quantized_linear(srows, d, group_size=sgs, bits=sbits, dtype=dtype, seed=seed + 4)
    su = quantized_linear(srows, d, group_size=sgs, bits=sbits, dtype=dtype, seed=seed + 5)
    kw = dict(group_size=gs, bits=bits, shared_group_size=sgs, shared_bits=sbits)
    return (x, inds, *g, *u, *sg, *su), kw


# the routers moe_gate_up_route takes: glm4_moe_lite's (+ 1e-20), DeepSeek-V3's groups (4 of 2 kept)
GLM = dict(routed_scaling_factor=1.8, norm_topk_prob=True, renorm_eps=1e-20)
GROUPS = dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, renorm_eps=None)


def _routed(args, kw, router, seed):
    """The same call routing from gates (..., E) in x's dtype and a float32 bias, as moe_gate_up_route
    takes it; router: GLM or GROUPS (None where the experts do not split into 4 groups)."""
    x, inds, *weights = args
    experts, k = weights[0].shape[0], inds.shape[-1]
    if router is GROUPS and (experts % 4 or experts < 8):  # 4 groups of >= 2 experts
        return None
    gates = mx.random.normal((*x.shape[:-1], experts), key=mx.random.key(seed)).astype(x.dtype)
    bias = 0.1 * mx.random.normal((experts,), key=mx.random.key(seed + 1))
    return (x, gates, *weights, bias), {**kw, **router, "top_k": k}


def _weights(proj):
    return proj.weight, getattr(proj, "scales", None), getattr(proj, "biases", None)


@pytest.mark.parametrize(
    "dtype,quant,squant",
    [
        (mx.bfloat16, (64, 4), (32, 8)),
        (mx.float16, (128, 8), (64, 4)),
        (mx.float32, (None, None), (None, None)),  # MLX's CPU gather_mm runs only float32
    ],
)
def test_reference_is_mlx_lm_switch_glu_and_shared_mlp_gate_and_up(dtype, quant, squant):
    """hr is SwitchGLU's activation(x_up, x_gate) and hs the shared Glm4MoeLiteMLP's swiglu,
    from mlx-lm's own (quantized) modules."""
    d, rows, srows, experts = 256, 24, 40, 8
    (gs, bits), (sgs, sbits) = quant, squant
    if bits is None:
        gate, up = (SwitchLinear(d, rows, experts, bias=False) for _ in range(2))
    else:
        gate, up = (QuantizedSwitchLinear(d, rows, experts, False, gs, bits) for _ in range(2))
    sgate, sup = (nn.Linear(d, srows, bias=False) for _ in range(2))
    for m in (gate, up, sgate, sup):
        m.set_dtype(dtype)
    if sbits is not None:
        sgate, sup = (m.to_quantized(group_size=sgs, bits=sbits) for m in (sgate, sup))
    x = mx.random.normal((1, 1, d)).astype(dtype)
    inds = mx.array([[[1, 3, 0, 7]]], dtype=mx.uint32)
    xe = mx.expand_dims(x, (-2, -3))
    want_r = swiglu(gate(xe, inds), up(xe, inds)).squeeze(-2)
    want_s = swiglu(sgate(x), sup(x))
    weights = (*_weights(gate), *_weights(up), *_weights(sgate), *_weights(sup))
    kw = dict(group_size=gs, bits=bits, shared_group_size=sgs, shared_bits=sbits)
    hr, hs = reference(x, inds, *weights, **kw)
    assert hr.dtype == dtype and hs.dtype == dtype
    assert mx.array_equal(hr, want_r).item() and mx.array_equal(hs, want_s).item()
    # routing first (moe_gate_up_route): MoEGate's experts and scores, then the same rows
    for module, router in ((glm4_moe_lite, GLM), (deepseek_v3, GROUPS)):
        margs = module.ModelArgs(
            hidden_size=d,
            n_routed_experts=experts,
            num_experts_per_tok=4,
            n_group=router.get("n_group", 1),
            topk_group=router.get("topk_group", 1),
            routed_scaling_factor=router["routed_scaling_factor"],
        )
        router_gate = module.MoEGate(margs)
        w = (mx.random.normal((experts, d), key=mx.random.key(5)) * d**-0.5).astype(dtype)
        router_gate.weight = w
        router_gate.e_score_correction_bias = bias = 0.1 * mx.random.normal((experts,), key=mx.random.key(6))
        want_i, want_sc = router_gate(x)
        got = moe_gate_up_route.reference(x, x @ w.T, *weights, bias, **kw, **router, top_k=4)
        assert mx.array_equal(got[2], want_i).item() and mx.array_equal(got[3], want_sc).item()
        want_r = swiglu(gate(xe, want_i), up(xe, want_i)).squeeze(-2)
        assert [a.dtype for a in got] == [dtype, dtype, mx.uint32, mx.float32]
        assert mx.array_equal(got[0], want_r).item() and mx.array_equal(got[1], want_s).item()


def test_launch_says_why_it_takes_the_reference():
    args, kw = _inputs(*CASES[0], mx.bfloat16)
    assert "4/8-bit" in launch("cuda", *args, **{**kw, "bits": 3}).reason
    assert launch("cuda", *args, **{**kw, "shared_bits": 3}).reason.startswith("shared expert: affine 3-bit")
    assert "without biases" in launch("cuda", *args[:10], None, *args[11:], **kw).reason
    assert "indices" in launch("cuda", args[0], args[1].astype(mx.int32), *args[2:], **kw).reason
    short = args[8][:, :16]  # shared gate weights of another width
    assert "shared expert: weights" in launch("cuda", *args[:8], short, *args[9:], **kw).reason
    spec = launch("cuda", *args, **kw)
    assert spec.grid == ((4 * 24 + 40) * 32, 1, 1)
    assert spec.output_shapes == [(1, 1, 4, 24), (1, 1, 40)]


def test_routing_first_takes_the_gates_and_bias_and_writes_inds_and_scores():
    """moe_gate_up_route: the same warps, the gates in the indices' slot and the bias last,
    inds and scores as extra outputs; what the router kernel refuses, it refuses."""
    args, kw = _routed(*_inputs(*CASES[0], mx.bfloat16), GLM, 7)
    spec = moe_gate_up_route.launch("cuda", *args, **kw)
    assert spec.grid == ((4 * 24 + 40) * 32, 1, 1)
    assert spec.inputs[1] is args[1] and spec.inputs[-1] is args[-1] and len(spec.inputs) == 15
    assert spec.output_shapes == [(1, 1, 4, 24), (1, 1, 40), (1, 1, 4), (1, 1, 4)]
    assert spec.output_dtypes == [mx.bfloat16, mx.bfloat16, mx.uint32, mx.float32]
    t = dict(spec.template)
    assert (t["E"], t["K"], t["N_GROUP"], t["HAS_EPS"]) == (8, 4, 1, True) and "ROWS" not in t
    assert "routing: 8 experts, top-9" in moe_gate_up_route.launch("cuda", *args, **{**kw, "top_k": 9}).reason
    grouped = moe_gate_up_route.launch("cuda", *args, **{**kw, "n_group": 3, "topk_group": 1}).reason
    assert grouped.startswith("routing: 8 experts in 3 groups")
    assert (
        "gates (1, 8) for x" in moe_gate_up_route.launch("cuda", args[0], args[1][0], *args[2:], **kw).reason
    )
    assert "no bias" in moe_gate_up_route.launch("cuda", *args[:-1], **kw).reason
    assert "tiled qmm" in moe_gate_up_route.launch("cuda", *args, **{**kw, "top_k": 8}).reason  # 8 rows


def test_cuda_takes_only_stock_matvec_calls():
    """On CUDA the kernel serves what stock runs through qmv/gemv: < 8 expert rows, and one
    token for the shared expert (a dense quantized_matmul leaves qmv from 2 rows on sm90)."""
    args, kw = _inputs((2, 1), 8, 4, 24, 40, 256, (64, 4), (64, 4), mx.bfloat16)  # 8 expert rows
    assert "tiled qmm" in launch("cuda", *args, **kw).reason
    args, kw = _inputs((2,), 8, 2, 24, 40, 256, (64, 4), (64, 4), mx.bfloat16)  # 4 expert rows, 2 tokens
    assert launch("cuda", *args, **kw).reason.startswith("shared expert: 2 rows: stock uses a tiled qmm")
    assert isinstance(launch("metal", *args, **kw), Launch)  # Metal is close anyway
    args, kw = _inputs((2,), 8, 2, 24, 40, 256, (64, 4), (None, None), mx.bfloat16)
    assert "shared expert: 2 rows: stock leaves its gemv" in launch("cuda", *args, **kw).reason
    args, kw = _inputs(*CASES[0], mx.bfloat16)
    f16 = [a.astype(mx.float16) if i in (9, 10, 12, 13) else a for i, a in enumerate(args)]  # shared s, b
    assert "shared expert: scales/biases not in the activations' dtype" in launch("cuda", *f16, **kw).reason


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_its_example_passes_the_self_check_on_emulated_metal(monkeypatch, tmp_path):
    """What a Mac runs before the first use: the kernel on its example() against the reference."""
    run = lambda self, backend, *a, **kw: metal_emu.run(self, *a, workdir=tmp_path, **kw)  # noqa: E731
    monkeypatch.setattr(KernelDef, "run_kernel", run)
    assert dataclasses.replace(moe_gate_up, _status={}).plan("metal") == ("metal", "kernel", "")


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
def test_the_routing_example_passes_the_self_check_in_the_gpus_order(tmp_path):
    """moe_gate_up_route's example (a tie among its biased scores) within the self-check's
    tolerance of the reference as a GPU runs it: the experts in the GPU sort's order (moe_router's
    body; the CPU's argpartition returns them in another order), then their rows."""
    args, kw = moe_gate_up_route.example()
    got = metal_emu.run(moe_gate_up_route, *args, workdir=tmp_path, **kw)
    assert got[2].tolist() == [[[5, 0, 3, 2]]]  # 0.5621... twice: expert 2 before 4
    router = {
        k: v for k, v in kw.items() if k in ("top_k", "routed_scaling_factor", "norm_topk_prob", "renorm_eps")
    }
    want_i, want_s = metal_emu.run(moe_router.moe_router, args[1], args[-1], workdir=tmp_path, **router)
    packing = {k: v for k, v in kw.items() if k not in router}
    want = (*reference(args[0], want_i, *args[2:-1], **packing), want_i, want_s)
    tol = moe_gate_up_route.tolerance
    assert all(mx.allclose(g, w, rtol=tol, atol=tol).item() for g, w in zip(got, want, strict=True))


def _emu_cases():
    """(case, dtype, router): the plain kernel and the group-limited routing in every case and
    dtype; GLM's routing (its rows are the plain kernel's, its experts moe_router's body's) in
    every case, the dtypes taking turns over the quantized ones (each compile of the emulation
    takes seconds): bf16 and fp16 twice, fp32 there and in the unquantized cases."""
    dtypes = [mx.bfloat16, mx.float16, mx.float32]
    quantized = [c for c in CASES if c[6] != (None, None)]
    for router, name in ((None, "inds"), (GROUPS, "route-groups")):
        for i, case in enumerate(CASES):
            for d in dtypes:
                yield pytest.param(case, d, router, id=f"{name}-{d}-case{i}".replace("mlx.core.", ""))
    for i, case in enumerate(CASES):
        d = dtypes[quantized.index(case) % 3] if case in quantized else mx.float32
        yield pytest.param(case, d, GLM, id=f"route-{d}-case{i}".replace("mlx.core.", ""))


@pytest.mark.skipif(not metal_emu.available(), reason="needs g++")
@pytest.mark.parametrize("case,dtype,router", list(_emu_cases()))
def test_metal_body_is_as_close_as_stock(tmp_path_factory, close_bar, case, dtype, router):
    """Routing first (moe_gate_up_route), the experts and scores are moe_router's Metal body's
    bitwise (the set mlx-lm's reference picks on the CPU), and the rows are then held as
    moe_gate_up's on those experts."""
    if case[6] == (None, None) and dtype != mx.float32:
        pytest.skip("MLX's CPU gather_mm (the reference) runs only float32")
    args, kw = _inputs(*case, dtype, seed=case[5] + case[3])
    work = tmp_path_factory.getbasetemp()
    if router is not None:
        routed = _routed(args, kw, router, seed=case[3])
        if routed is None:
            pytest.skip("the experts do not split into 4 groups")
        rargs, rkw = routed
        got = metal_emu.run(moe_gate_up_route, *rargs, workdir=work, **rkw)  # poisoned NaN
        router_kw = {k: v for k, v in rkw.items() if k not in kw}
        want_i, want_s = metal_emu.run(moe_router.moe_router, rargs[1], rargs[-1], workdir=work, **router_kw)
        assert mx.array_equal(got[2], want_i).item() and mx.array_equal(got[3], want_s).item()
        cpu_i = moe_gate_up_route.reference(*rargs, **rkw)[2]
        assert mx.array_equal(mx.sort(got[2], axis=-1), mx.sort(cpu_i, axis=-1)).item()
        args = (args[0], got[2], *args[2:])  # the rows of the experts it routed to
    else:
        got = metal_emu.run(moe_gate_up, *args, workdir=work, **kw)  # poisoned NaN
    for j in range(2):
        want, bar = close_bar(
            lambda *a, **k: reference(*a, **k)[j], lambda *a, **k: reference_f32(*a, **k)[j], args, kw, dtype
        )
        assert got[j].dtype == dtype and got[j].shape == want.shape
        assert mx.abs(got[j].astype(mx.float32) - want).max().item() <= bar, j


CUDA_CASES = [c for c in CASES if c[0] != (3,)] + [
    ((1, 1), 64, 4, 1536, 1536, 2048, (64, 4), (64, 4)),  # GLM-4.7-Flash
    ((1, 1), 64, 4, 1536, 1536, 2048, (None, None), (None, None)),  # and in bf16
    ((1,), 9, 1, 40, 24, 1536, (32, 4), (128, 8)),  # remainder tile
    ((1,), 8, 4, 33, 35, 2048, (128, 8), (32, 4)),
    ((1, 1), 8, 4, 32, 32, 352, (32, 8), (None, None)),  # gemv: 1 per lane
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("router", [None, GLM, GROUPS], ids=["inds", "route", "route-groups"])
def test_cuda_kernel_is_bitwise_stock(case, dtype, router):
    """With a router (moe_gate_up_route), stock is mlx-lm's routing ops on the GPU (its sort's
    order) then the same experts' ops: all four outputs bitwise."""
    args, kw = _inputs(*case, dtype, seed=case[5] + case[3])
    kernel = moe_gate_up
    if router is not None:
        routed = _routed(args, kw, router, seed=case[3])
        if routed is None:
            pytest.skip("the experts do not split into 4 groups")
        (args, kw), kernel = routed, moe_gate_up_route
    got = kernel.run_kernel("cuda", *args, init_value=float("nan"), **kw)  # poisoned
    want = kernel.reference(*args, **kw)
    assert len(got) == len(want) == (2 if router is None else 4)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert mx.array_equal(g, w).item(), mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max().item()
