"""moe_gate_up: the routed experts' and the shared expert's gate + up + SwiGLU in one
launch (decode; launch 2 of the moe_block).

Stock (mlx-lm `Glm4MoeLiteMoE`: `SwitchGLU` up to its down projection, and the shared
`Glm4MoeLiteMLP` up to its own):

    up   = gather_qmm(x, up_w, ..., rhs_indices=inds)     # (..., k, 1, I), rounded to T
    gate = gather_qmm(x, gate_w, ..., rhs_indices=inds)
    hr   = silu(gate) * up                                 # in T
    hs   = swiglu(quantized_matmul(x, sgate_w, ...), quantized_matmul(x, sup_w, ...))  # (..., Is)

Fused: moe_mlp's kernel with the shared expert's rows in the same launch. One 32-lane warp
per output element: warps below N*k*I take a routed expert's row (as moe_mlp), the warps
past them the shared expert's N*Is rows (as swiglu_mlp), with the shared weights' own
packing (they may be quantized differently from the experts). x is read by both; six
stock launches (four matmuls, two SwiGLUs) become one.

`moe_gate_up_route` (`route=True`, moe_block's launch 2 after norm_router_gates): the same
body takes the router's gates (..., E) and bias instead of inds, and every routed warp first
routes its token itself (csrc/moe_router.h's `zmlx_route_warp`: moe_router's arithmetic,
warp-level, no barrier; ~K warp butterflies before its dots); the token's first warp writes
inds and scores as moe_router would, for moe_down. Outputs (hr, hs, inds, scores).

Fidelity: on CUDA the dots follow MLX's qmv (gemv for unquantized weights) and SwiGLU is
MLX's own device functors (csrc/quant.h), so both outputs are bitwise stock wherever
stock runs its matvecs: fewer than 8 expert rows for the routed side, and one token for
the shared side (a dense quantized_matmul leaves qmv from 2 rows on sm90; mxfp4 from 8):
other calls take the reference. Each side is affine, mxfp4 or unquantized. From 8 expert
rows stock's gather_qmm runs qmm_sm80 on affine weights of its tile shapes: with
quant.QMM_ORDER and QMM_BLOCK the routed warps follow that order there (QMM: moe_mlp's QMM
warps, one per 8 outputs, each dot an mma chain in stock's k-order, rounded to T, then SwiGLU
as above; PIPE with quant.QMM_PIPELINED), while the shared rows, one token's dense matmul
and so stock's qmv still, keep qmv's arithmetic; QMM_BLOCK off, those calls skip. Routing in
the warp changes nothing: each warp's experts are moe_router's. On Metal the dot is a plain
float32 sum: `close`.

Device code: csrc/moe_gate_up_body.h (moe_mlp's body and its shared rows); the dot and
SwiGLU are csrc/quant.h, the routing csrc/moe_router.h, the QMM warps csrc/qmm_gate_up.h
(qmm_sm80's order: csrc/qmm_order.h; its activation switch names csrc/swiglu_oai.h's).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import mlx.core as mx

from zmlx.kernels import moe_mlp, moe_router, quant, swiglu_mlp
from zmlx.kernels.core import KernelDef, Launch, Skip, device_code
from zmlx.kernels.moe_mlp import quantized_experts
from zmlx.kernels.swiglu_mlp import quantized_linear


def reference(
    x,
    sel,
    gate_w,
    gate_s,
    gate_b,
    up_w,
    up_s,
    up_b,
    sgate_w,
    sgate_s,
    sgate_b,
    sup_w,
    sup_s,
    sup_b,
    bias=None,
    *,
    group_size=None,
    bits=None,
    shared_group_size=None,
    shared_bits=None,
    mode="affine",
    shared_mode="affine",
    f32=False,
    route=False,
    **router,
):
    """mlx-lm's op sequences. x (..., D), sel: inds (..., k) -> (hr (..., k, I), hs (..., Is)) in
    x's dtype: the routed experts' SwiGLU (moe_mlp) and the shared expert's (swiglu_mlp).
    route=True: sel is the router's gates (..., E), routed with `bias` and `router` (top_k,
    n_group, ...) by moe_router's reference first -> (hr, hs, inds, scores).
    f32: the same in float32 throughout (reference_f32)."""
    routed_ref = moe_mlp.reference_f32 if f32 else moe_mlp.reference
    shared_ref = swiglu_mlp.reference_f32 if f32 else swiglu_mlp.reference
    inds, scores = moe_router.reference(sel, bias, **router) if route else (sel, None)
    routed = (gate_w, gate_s, gate_b, up_w, up_s, up_b)
    shared = (sgate_w, sgate_s, sgate_b, sup_w, sup_s, sup_b)
    hr = routed_ref(x, inds, *routed, group_size=group_size, bits=bits, mode=mode)
    hs = shared_ref(x, *shared, group_size=shared_group_size, bits=shared_bits, mode=shared_mode)
    return (hr, hs, inds, scores) if route else (hr, hs)


def reference_f32(*args, **kwargs):
    """reference's math in float32 throughout: the accuracy bar."""
    return reference(*args, f32=True, **kwargs)


class _Indices(NamedTuple):
    """What moe_mlp.launch reads of the indices (their shape and dtype) where the kernel
    computes them itself (route=True)."""

    shape: tuple
    dtype: mx.Dtype


def launch(
    backend,
    x,
    sel,
    gate_w,
    gate_s,
    gate_b,
    up_w,
    up_s,
    up_b,
    sgate_w,
    sgate_s,
    sgate_b,
    sup_w,
    sup_s,
    sup_b,
    bias=None,
    *,
    group_size=None,
    bits=None,
    shared_group_size=None,
    shared_bits=None,
    mode="affine",
    shared_mode="affine",
    route=False,
    **router,
) -> Launch | Skip:
    inds, routing = sel, []
    if route:  # the router's own checks (moe_router's kernel takes what this one takes)
        if bias is None or "top_k" not in router:
            return Skip("no bias or top_k to route with")
        spec = moe_router.launch(backend, sel, bias, **router)
        if isinstance(spec, Skip):
            return Skip(f"routing: {spec.reason}")
        if sel.shape[:-1] != x.shape[:-1]:
            return Skip(f"gates {sel.shape} for x {x.shape}")
        routing = [(name, v) for name, v in spec.template if name not in ("K", "ROWS")]
        inds = _Indices(x.shape[:-1] + (router["top_k"],), mx.uint32)
    # each side's shapes, dtypes and regime are checked as its own kernel checks them
    routed = moe_mlp.launch(
        backend,
        x,
        inds,
        gate_w,
        gate_s,
        gate_b,
        up_w,
        up_s,
        up_b,
        group_size=group_size,
        bits=bits,
        mode=mode,
    )
    if isinstance(routed, Skip):
        return routed
    shared = swiglu_mlp.launch(
        backend,
        x,
        sgate_w,
        sgate_s,
        sgate_b,
        sup_w,
        sup_s,
        sup_b,
        group_size=shared_group_size,
        bits=shared_bits,
        mode=shared_mode,
    )
    if isinstance(shared, Skip):
        return Skip(f"shared expert: {shared.reason}")
    t, s = dict(routed.template), dict(shared.template)
    if t["QMM"] and not quant.QMM_BLOCK:
        return Skip(
            f"{t['N'] * t['K']} expert rows: stock's qmm_sm80 (moe_block's kernels follow its qmv only)"
        )
    n, k, i, i_s = t["N"], t["K"], t["I"], s["I"]
    # QMM: a routed warp per 8 outputs (moe_mlp's QMM warps); then a warp per shared row, as ever
    warps = n * k * (i // 8 if t["QMM"] else i) + n * i_s
    if warps * 32 >= 2**31:
        return Skip(f"{warps} rows is too large for one launch")
    # moe_mlp's x, inds and six weight arrays (no projection biases here), then the shared
    # side's inputs past its x and no-indices
    inputs = routed.inputs[:8] + shared.inputs[2:]
    output_shapes, output_dtypes = routed.output_shapes + shared.output_shapes, [x.dtype, x.dtype]
    if route:
        inputs = [x, sel, *inputs[2:], bias]
        output_shapes += [inds.shape, inds.shape]
        output_dtypes += [mx.uint32, mx.float32]
    return Launch(
        inputs=inputs,
        # moe_mlp's (QMM and PIPE as it chose them; both false for qmv rows), the shared packing
        template=list(routed.template) + [("IS", i_s), ("SGS", s["GS"]), ("SBITS", s["BITS"])] + routing,
        grid=(warps * 32, 1, 1),
        # no barrier, any block: moe_mlp's (QMM pipelined: 2 warps, its few warps over every SM)
        threadgroup=(64 if t["PIPE"] else 256, 1, 1),
        output_shapes=output_shapes,
        output_dtypes=output_dtypes,
    )


def example():
    x = mx.random.normal((1, 1, 256), key=mx.random.key(71)).astype(mx.bfloat16)
    inds = mx.array([[[3, 0, 5, 1]]], dtype=mx.uint32)
    g = quantized_experts(6, 9, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=72)
    u = quantized_experts(6, 9, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=73)
    sg = quantized_linear(13, 256, group_size=128, bits=8, dtype=mx.bfloat16, seed=74)
    su = quantized_linear(13, 256, group_size=128, bits=8, dtype=mx.bfloat16, seed=75)
    return (x, inds, *g, *u, *sg, *su), dict(group_size=64, bits=4, shared_group_size=128, shared_bits=8)


def route_example():
    """example()'s call with the gates of 6 experts (bf16, exact ties among them) to route."""
    (x, _, *weights), kw = example()
    gates = mx.array([[[0.5, -1.0, 0.25, 1.5, 0.25, -0.5]]], dtype=mx.bfloat16)
    bias = mx.array([0.0, 0.125, 0.0, -0.25, 0.0, 0.5])
    router = dict(top_k=4, routed_scaling_factor=1.8, norm_topk_prob=True, renorm_eps=1e-20)
    return (x, gates, *weights, bias), {**kw, **router}


def qmm_example(backend: str = "cuda"):
    """A call of the QMM variant: one token's 8 expert rows of 128 outputs, and a shared expert
    (one token: qmv); None where no call takes it (off CUDA, or quant.QMM_ORDER or QMM_BLOCK
    off): the self-check's variant_example."""
    if backend != "cuda" or not (quant.QMM_ORDER and quant.QMM_BLOCK):
        return None
    x = mx.random.normal((1, 1, 256), key=mx.random.key(76)).astype(mx.bfloat16)
    inds = mx.array([[[3, 0, 5, 1, 9, 2, 11, 7]]], dtype=mx.uint32)
    g = quantized_experts(12, 128, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=77)
    u = quantized_experts(12, 128, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=78)
    sg = quantized_linear(40, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=79)
    su = quantized_linear(40, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=80)
    return (x, inds, *g, *u, *sg, *su), dict(group_size=64, bits=4, shared_group_size=64, shared_bits=4)


def qmm_route_example(backend: str = "cuda"):
    """qmm_example's call routed from the gates of its 12 experts, top-8."""
    if (call := qmm_example(backend)) is None:
        return None
    (x, _, *weights), kw = call
    gates = mx.random.normal((1, 1, 12), key=mx.random.key(81)).astype(mx.bfloat16)
    bias = mx.random.normal((12,), key=mx.random.key(82)) * 0.25
    router = dict(top_k=8, routed_scaling_factor=2.5, norm_topk_prob=True, renorm_eps=1e-20)
    return (x, gates, *weights, bias), {**kw, **router}


# csrc/qmm_gate_up.h's warps (QMM) and what they call
_QMM_HEADERS = ("swiglu_oai.h", "qmm_order.h", "qmm_gate_up.h")

moe_gate_up = KernelDef(
    name="moe_gate_up",
    reference=reference,
    fidelity="close",
    exact_on=("cuda",),  # bitwise stock's qmv/gemv (+ swiglu) where launch() takes the call
    tolerance=2**-3,  # the self-check only: a few bf16 roundings, far below a layout error
    body=device_code("moe_gate_up_body.h"),
    header="#define ZMLX_ROUTE 0\n" + device_code("quant.h", *_QMM_HEADERS),
    input_names=moe_mlp.SHARED["input_names"] + ("sgate_w", "sgate_s", "sgate_b", "sup_w", "sup_s", "sup_b"),
    output_names=("out", "sout"),
    launch=launch,
    example=example,
    variant_example=qmm_example,
)

# The same body and reference routing the token first (moe_block's launch 2 after
# norm_router_gates): other inputs and outputs, so a KernelDef of its own.
moe_gate_up_route = KernelDef(
    name="moe_gate_up_route",
    reference=functools.partial(reference, route=True),
    fidelity="close",
    exact_on=("cuda",),  # and bitwise moe_router's (stock's) routing
    tolerance=2**-3,
    body=moe_gate_up.body,
    header="#define ZMLX_ROUTE 1\n" + device_code("quant.h", "moe_router.h", *_QMM_HEADERS),
    input_names=("x", "gates") + moe_gate_up.input_names[2:] + ("bias",),
    output_names=("out", "sout", "inds", "scores"),
    launch=functools.partial(launch, route=True),
    example=route_example,
    variant_example=qmm_route_example,
)
