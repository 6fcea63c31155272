"""The block patterns' kernels in the per-kernel micro-benchmark (zmlx.bench.kernels), at
GLM-4.7-Flash's decode shapes (one token, affine 4-bit, group 64, bf16): each kernel against
its reference, which is the stock op sequence it replaces (mla_q_prep's reference widens
stock's `embed_q` output to float32 at the end, one cheap op more on the stock side). The
kernels the block patterns call through prepared launches are timed both ways: through
their public function (which plans every call) and prepared ("(prepared)" cases), as the
patterns call them.

moe_block with a shared expert: `norm_router_gates` (residual add + RMSNorm + gate matvec over
E / 8 threadgroups), `moe_gate_up_route` (routing from the gates + routed and shared experts'
gate + up + SwiGLU), `moe_down` (down projections + combine + shared expert + residual add).
Also timed: `norm_router` (the norm, the gate matvec and the routing in one threadgroup per
token: the block without a shared expert) and `moe_gate_up` (the experts from given indices).
mla_block: `norm_qkv_a` (input RMSNorm + q_a and kv_a projections), `mla_q_prep` (q_a norm +
q_b + RoPE/scale + embed_q, kv norm + RoPE of k_pe); mla_prologue's `mla_q_prep_nope` (the
same without embed_q: q_nope out).
"""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx

from zmlx.bench.kernels import Case
from zmlx.kernels import mla_q_prep as q_prep
from zmlx.kernels import norm_qkv_a as qkv_a
from zmlx.kernels import norm_router as router
from zmlx.kernels.moe_down import moe_down
from zmlx.kernels.moe_down import reference as down_stock
from zmlx.kernels.moe_gate_up import moe_gate_up, moe_gate_up_route
from zmlx.kernels.moe_gate_up import reference as gate_up_stock
from zmlx.kernels.moe_mlp import quantized_experts
from zmlx.kernels.prepared import prepare
from zmlx.kernels.swiglu_mlp import quantized_linear

# GLM-4.7-Flash: hidden 2048, 64 experts (8 stored: a call reads only its 4 either way),
# top-4, expert and shared intermediate 1536; attention 20 heads, q_lora_rank 768, nope 192,
# rope 64, kv_lora_rank 512
D, E, K, INTER = 2048, 64, 4, 1536
HEADS, QLR, NOPE, ROPE, RANK = 20, 768, 192, 64, 512
Q4 = dict(group_size=64, bits=4)


def _case(name: str, shape: str, stock, fused, args: tuple, kwargs: dict) -> Case:
    """stock's ops against the fused kernel through its public function (which plans every call)."""
    return Case(
        name, shape, functools.partial(stock, *args, **kwargs), functools.partial(fused, *args, **kwargs)
    )


def _cases(
    name: str, shape: str, stock, fused, args: tuple, kwargs: dict, live: tuple[int, ...]
) -> list[Case]:
    """_case, and the same kernel called as the block patterns call it: a prepared launch
    (zmlx.kernels.prepared) fed the per-call arguments `live` names ("<name> (prepared)")."""
    call = prepare(fused, args, kwargs, live)
    prepared = Case(
        f"{name} (prepared)",
        shape,
        functools.partial(stock, *args, **kwargs),
        functools.partial(call, *(args[i] for i in live)),
    )
    return [_case(name, shape, stock, fused, args, kwargs), prepared]


def moe_block_cases() -> list[Case]:
    x, r, norm_w, gate_w, bias = router.inputs((1, 1), D, E, mx.bfloat16, seed=61)
    route_kw: dict[str, Any] = dict(
        eps=1e-5, top_k=K, routed_scaling_factor=1.8, norm_topk_prob=True, renorm_eps=1e-20
    )
    h, xn, inds, scores = router.reference(x, r, norm_w, gate_w, bias, **route_kw)
    inds = inds % 8  # the 8 experts stored
    gate = quantized_experts(8, INTER, D, dtype=mx.bfloat16, seed=62, **Q4)
    up = quantized_experts(8, INTER, D, dtype=mx.bfloat16, seed=63, **Q4)
    down = quantized_experts(8, D, INTER, dtype=mx.bfloat16, seed=64, **Q4)
    sgate = quantized_linear(INTER, D, dtype=mx.bfloat16, seed=65, **Q4)
    sup = quantized_linear(INTER, D, dtype=mx.bfloat16, seed=66, **Q4)
    sdown = quantized_linear(D, INTER, dtype=mx.bfloat16, seed=67, **Q4)
    shared_kw = dict(**Q4, shared_group_size=64, shared_bits=4)
    hr, hs = gate_up_stock(xn, inds, *gate, *up, *sgate, *sup, **shared_kw)
    # moe_gate_up_route routes over all E gates; a bias that favours the 8 experts stored keeps
    # its choice among them (the same arithmetic whatever it picks)
    gates = router.reference(x, r, norm_w, gate_w, eps=route_kw["eps"], route=False)[2]
    favour = bias + mx.where(mx.arange(E) < 8, 8.0, 0.0)
    router_kw = {k: v for k, v in route_kw.items() if k != "eps"}
    mx.eval(x, r, h, xn, inds, scores, gate, up, down, sgate, sup, sdown, hr, hs, gates, favour)
    shape = "1 token, 4-bit"
    return [
        *_cases(
            "norm_router_gates",
            f"{shape}, {D} wide, {E} experts over {E // router.GATES_PER_GROUP} threadgroups",
            functools.partial(router.reference, route=False),
            router.norm_router_gates,
            (x, r, norm_w, gate_w),
            dict(eps=route_kw["eps"]),
            live=(0, 1),
        ),
        *_cases(
            "moe_gate_up_route",
            f"{shape}, routing {E} gates top-{K}, {K} experts + shared, 2 x {INTER} x {D}",
            functools.partial(gate_up_stock, route=True),
            moe_gate_up_route,
            (xn, gates, *gate, *up, *sgate, *sup, favour),
            {**shared_kw, **router_kw},
            live=(0, 1),
        ),
        *_cases(
            "norm_router",
            f"{shape}, {D} wide, {E} experts, top-{K}, routed in one threadgroup",
            router.reference,
            router.norm_router,
            (x, r, norm_w, gate_w, bias),
            route_kw,
            live=(0, 1),
        ),
        *_cases(
            "moe_gate_up",
            f"{shape}, {K} given experts + shared, 2 x {INTER} x {D}",
            gate_up_stock,
            moe_gate_up,
            (xn, inds, *gate, *up, *sgate, *sup),
            shared_kw,
            live=(0, 1),
        ),
        *_cases(
            "moe_down",
            f"{shape}, {K} experts + shared, {D} x {INTER}, + residual",
            down_stock,
            moe_down,
            (hr, inds, scores, *down, h, hs, *sdown),
            shared_kw,
            live=(0, 1, 2, 6, 7),
        ),
    ]


def mla_block_cases(position: int = 4095) -> list[Case]:
    from zmlx.kernels.glm47_rope import rope_table

    args, kw = qkv_a.inputs(
        (1, 1), D, QLR, RANK + ROPE, mx.bfloat16, seed=71, **Q4, kv_group_size=64, kv_bits=4
    )
    prep = q_prep.inputs(1, HEADS, QLR, NOPE, ROPE, RANK, mx.bfloat16, seed=72, packing=Q4, embed_packing=Q4)
    prep_kw = q_prep.kwargs(HEADS, NOPE, ROPE, packing=Q4, embed_packing=Q4, base=1_000_000.0)
    table = rope_table(ROPE, 1_000_000.0, 1.0, position + 1)
    mx.eval(args, prep, table)
    shape = "1 token, 4-bit"
    return [
        *_cases(
            "norm_qkv_a",
            f"{shape}, {D} wide, q_a {QLR} + kv_a {RANK + ROPE} rows",
            qkv_a.reference,
            qkv_a.norm_qkv_a,
            args,
            kw,
            live=(0,),
        ),
        *_cases(  # mla_prologue's second launch: a head's rows over several threadgroups
            "mla_q_prep_nope",
            f"{shape}, {HEADS} heads, q_b {NOPE + ROPE} x {QLR}, pos {position}",
            q_prep.reference_nope,
            q_prep.mla_q_prep_nope,
            (*prep[:7], table, position),
            {k: v for k, v in prep_kw.items() if not k.startswith("embed_")},
            live=(0, 1),
        ),
        _case(
            "mla_q_prep (close)",
            f"{shape}, {HEADS} heads, q_b {NOPE + ROPE} x {QLR}, embed_q {RANK} x {NOPE}, pos {position}",
            q_prep.reference,
            q_prep.mla_q_prep,
            (*prep, table, position),
            prep_kw,
        ),
    ]
