"""moe_block: the MoE half of a decoder layer at decode in three prepared launches (close).

Patches the decoder layer (on glm4_moe_lite: `Glm4MoeLiteDecoderLayer`; the DeepSeek-style
layers have the same attributes: self_attn, input_layernorm, post_attention_layernorm, mlp,
and their MoE the same gate and experts) as the MoE half of zmlx.patch.layer's shared
`__call__`. A decode step (one token per sequence) runs the layer's attention half as it is
(stock, as an attention pattern patched it, or mla_block's), then

    MoE layer:   norm_router_gates (h = x + r, xn = post_attention_layernorm(h), the gate
                               matvec over many threadgroups)
                 moe_gate_up_route (each warp routes its token from the gates, then the routed
                               and shared experts' gate + up + SwiGLU; writes inds, scores)
                 moe_down     (down projections, routing-weighted combine, shared expert, h + y)
    MoE layer without a shared expert: norm_router (norm, gate and routing in one threadgroup
                 per token), moe_mlp, moe_down
    softmax-routed MoE layer (Qwen3-MoE, gpt-oss: the family data names `softmax_first`):
                 residual_norm, mlx-lm's gate module, softmax_router, moe_mlp, and moe_down
                 (gpt-oss: mlx-lm's down projection with its bias, sum and add), behind
                 SOFTMAX_LAYERS (zmlx.patch.softmax_layer)
    dense layer: residual_norm, swiglu_mlp, moe_down (dense: h + down(...))

Each launch is prepared once per (layer, input shapes, dtypes, backend) with the weights it
read (zmlx.kernels.prepared): a decode step checks the weights are still the module's and
goes straight to the built kernels. Prompts, steps whose rows mlx-lm sorts by expert, and
steps any launch skips (its reason: `decode_plan`) run mlx-lm's code, where the module
patterns inside the layer (moe_router, moe_mlp, downproj_combine, ...) still apply. On the
CPU the launches run their references: stock's op sequence, bitwise. residual_norm's model
loop would go around the layers' `__call__`, so it yields to moe_block (Pattern.yields_to).
"""

from __future__ import annotations

import math
import operator

import mlx.core as mx
import mlx.nn as nn

from zmlx import backend as _backend
from zmlx.distributed import moe_sharded, sharded_linear_reason
from zmlx.kernels.moe_down import moe_down
from zmlx.kernels.moe_gate_up import moe_gate_up_route
from zmlx.kernels.moe_mlp import moe_mlp
from zmlx.kernels.norm_router import norm_router, norm_router_gates
from zmlx.kernels.prepared import Prepared, prepare
from zmlx.kernels.quant import MLX_LM_SORT_ROWS, MODES, linear_reason, switch_linear_reason, weights_of
from zmlx.kernels.residual_norm import residual_norm
from zmlx.kernels.softmax_router import softmax_router
from zmlx.kernels.swiglu_mlp import swiglu_mlp
from zmlx.patch import softmax_layer, softmax_moe
from zmlx.patch.layer import Routing, blocks_of, make, stock_moe
from zmlx.patch.layer import registry as layer_registry
from zmlx.patch.moe import experts_reason, router_reason
from zmlx.patch.pattern import Pattern

# The softmax-routed MoE layers (Qwen3-MoE's, gpt-oss's) take the block since its cuda test
# (tests/patch/test_moe_block_softmax.py, and the family's preset test) ran bitwise on the
# H200 (switch_checks.sh softmax-layers). Off, their check says so and the family's module
# patterns run them.
SOFTMAX_LAYERS = True

# Each prepared block (one sequence, fixed shapes) called through mx.compile, traced once:
# MLX then replays its launches instead of building every custom kernel call anew (its
# whole source string) at each step, which costs the host more than a stock op (NOTEBOOK,
# sixteenth session). The kernels are the same. On since the presets ran bitwise with it on
# the H200 (tests/patch/test_moe_block_compiled.py, switch_checks.sh moe-block-compiled) and
# the host A/B was faster in every round (profile_host.py --ab moe_compiled: Qwen3-30B-A3B's
# pipelined step 19.28 -> 12.56 ms, GLM-4.7-Flash's 25.18 -> 23.44 ms, medians of 3 rounds;
# benchmarks/results/20261202-h200-ab-moe-compiled-*-c392535.log), 2026-12-02.
COMPILED = True


class _Compiled:
    """A prepared block called through mx.compile (its `launches` for the decode plan)."""

    __slots__ = ("launches", "block", "_fn")

    def __init__(self, block):
        self.launches, self.block = block.launches, block
        self._fn = mx.compile(block.__call__)

    def __call__(self, x, r):
        return self._fn(x, r)


def _mlp_reason(name: str, mlp) -> str | None:
    for proj in ("gate_proj", "up_proj", "down_proj"):
        p, where = getattr(mlp, proj, None), f"{name}.{proj}"
        if (why := sharded_linear_reason(where, p) or linear_reason(where, p, MODES)) is not None:
            return why
    if weights_of(mlp.gate_proj)[1] != weights_of(mlp.up_proj)[1]:
        return f"{name}: gate_proj and up_proj are quantized differently"
    return None


def _moe_reason(moe) -> str | None:
    if (why := router_reason(moe.gate)) is not None:
        return why
    if (why := _switch_reason(moe.switch_mlp)) is not None:
        return why
    if moe.config.n_shared_experts is not None:
        return _mlp_reason("shared_experts", moe.shared_experts)
    return None


def _switch_reason(sw) -> str | None:
    if (why := experts_reason(sw)) is not None:
        return why
    for proj in ("gate_proj", "up_proj", "down_proj"):
        if (why := switch_linear_reason(f"switch_mlp.{proj}", getattr(sw, proj), MODES)) is not None:
            return why
    if weights_of(sw.gate_proj)[1] != weights_of(sw.up_proj)[1]:
        return "switch_mlp: gate_proj and up_proj are quantized differently"
    return None


def check(layer, params) -> str | None:
    name = params.get("mlp_name", "mlp")  # the family data's name of the MoE half's module
    for attr in ("self_attn", "input_layernorm", "post_attention_layernorm", name):
        if not hasattr(layer, attr):
            return f"decoder layer has no {attr}"
    if type(layer.post_attention_layernorm) is not nn.RMSNorm:
        return f"post_attention_layernorm is a {type(layer.post_attention_layernorm).__name__}"
    mlp = getattr(layer, name)
    routed = hasattr(mlp, "switch_mlp") or (hasattr(mlp, "experts") and hasattr(mlp, "router"))
    if routed and params.get("softmax_first") is not None:  # the family's softmax routing
        if not SOFTMAX_LAYERS:
            return "softmax-routed MoE layers wait for their cuda test (moe_block.SOFTMAX_LAYERS)"
        return softmax_layer.reason(mlp, Routing(**params), _switch_reason)
    if hasattr(mlp, "switch_mlp"):
        return _moe_reason(mlp)
    if routed:  # gpt-oss's MLPBlock without its family's routing
        return experts_reason(mlp.experts) or router_reason(mlp.router)
    return _mlp_reason("mlp", mlp)


# ---------------------------------------------------------------- the prepared block


# Modules are read as items (m["mlp"]): a dict lookup (see zmlx.patch.layer).


def _arrays(mlp) -> tuple:
    """The gate, up and down projections' (weight, scales, biases) of an MLP or SwitchGLU."""
    g, u, d = mlp["gate_proj"], mlp["up_proj"], mlp["down_proj"]
    return (
        *(g["weight"], g.get("scales"), g.get("biases")),
        *(u["weight"], u.get("scales"), u.get("biases")),
        *(d["weight"], d.get("scales"), d.get("biases")),
    )


def _weights(layer, routing: Routing) -> tuple:
    """Every array the block's launches read, in a fixed order: a prepared block holds for
    these objects only (a model whose weights were replaced or quantized since is prepared
    again)."""
    mlp = layer[routing.mlp_name]
    norm_w = layer["post_attention_layernorm"]["weight"]
    if routing.softmax_first is not None and ("switch_mlp" in mlp or "router" in mlp):
        return (norm_w, *softmax_layer.weights(mlp))
    if "switch_mlp" not in mlp:
        return (norm_w, *_arrays(mlp))
    gate = mlp["gate"]
    out = (norm_w, gate["weight"], gate["e_score_correction_bias"], *_arrays(mlp["switch_mlp"]))
    if mlp.config.n_shared_experts is None:
        return out
    return out + _arrays(mlp["shared_experts"])


class _MoE:
    __slots__ = ("launches", "shared", "group", "zero")

    def __init__(self, launches: list[Prepared], shared: bool, group=None, zero=None):
        self.launches, self.shared = tuple(launches), shared  # route, gate_up, down
        self.group, self.zero = group, zero  # tensor parallel: mlx-lm's group, a zero residual

    def __call__(self, x, r):
        norm, gate_up, down = self.launches
        # A tensor-parallel MoE's output is a partial sum that mlx-lm all-sums before the
        # layer's residual add: moe_down adds a zero residual (y + 0 is y, bitwise) and h is
        # added after the all-sum, once, not once per process.
        if self.shared:  # the routing is moe_gate_up_route's, from norm_router_gates' gates
            h, xn, gates = norm(x, r)
            resid = h if self.group is None else self.zero
            hr, hs, inds, scores = gate_up(xn, gates)
            y = down(hr, inds, scores, resid, hs)
        else:
            h, xn, inds, scores = norm(x, r)
            resid = h if self.group is None else self.zero
            y = down(gate_up(xn, inds), inds, scores, resid)
        return y if self.group is None else h + mx.distributed.all_sum(y, group=self.group)


class _Dense:
    __slots__ = ("launches",)

    def __init__(self, launches: list[Prepared]):
        self.launches = tuple(launches)  # norm, gate_up, down

    def __call__(self, x, r):
        norm, gate_up, down = self.launches
        h, xn = norm(x, r)
        return down(gate_up(xn), h)


class _Stock(Exception):
    """This step runs mlx-lm's code; the message says why."""


def _build(layer, x, r, routing: Routing, backend) -> _MoE | softmax_layer.Block | _Dense | str:
    """The block's three launches prepared for x and r (each one's outputs give the next
    its shapes), or why this step runs mlx-lm's code."""
    norm, mlp = layer.post_attention_layernorm, layer[routing.mlp_name]
    launches: list[Prepared] = []

    def run(kernel, args, kwargs, live):
        p = prepare(kernel, args, kwargs, live, backend)
        if p.skip:
            raise _Stock(p.skip)
        launches.append(p)
        return p(*(args[i] for i in live))

    try:
        group = mlp.sharding_group if moe_sharded(mlp) else None
        zero = None if group is None else mx.zeros(x.shape, x.dtype)
        if routing.softmax_first is not None and ("switch_mlp" in mlp or "router" in mlp):
            kind = softmax_moe.kind_of(routing.softmax_first, routing.topk_last)
            if (
                rows := math.prod(x.shape[:-1]) * softmax_moe.routing(mlp, kind)["top_k"]
            ) >= MLX_LM_SORT_ROWS:
                raise _Stock(f"{rows} expert rows: mlx-lm sorts them by expert (its own path)")
            return softmax_layer.build(layer, x, r, routing, run, launches, group, zero)
        if not hasattr(mlp, "switch_mlp"):  # the dense layer
            (gate, packing), (up, _), (down, down_packing) = map(
                weights_of, (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            )
            h, xn = run(residual_norm, (x, r, norm["weight"], norm.eps), {}, (0, 1))
            a = run(swiglu_mlp, (xn, *gate, *up), packing, (0,))
            run(moe_down, (a, None, None, *down, h), down_packing, (0, 6))
            return _Dense(launches)
        g, sw = mlp.gate, mlp.switch_mlp
        rows = math.prod(x.shape[:-1]) * g.top_k
        if rows >= MLX_LM_SORT_ROWS:
            raise _Stock(f"{rows} expert rows: mlx-lm sorts them by expert (its own path)")
        (gate, packing), (up, _), (down, down_packing) = map(
            weights_of, (sw.gate_proj, sw.up_proj, sw.down_proj)
        )
        router_kw = dict(
            top_k=g.top_k,
            n_group=g.n_group,
            topk_group=g.topk_group,
            routed_scaling_factor=g.routed_scaling_factor,
            norm_topk_prob=g.norm_topk_prob,
            renorm_eps=routing.renorm_eps,
        )
        bias = g["e_score_correction_bias"]
        norm_args = (x, r, norm["weight"], g["weight"])
        if mlp.config.n_shared_experts is None:
            h, xn, inds, scores = run(
                norm_router, (*norm_args, bias), dict(eps=norm.eps, **router_kw), (0, 1)
            )
            resid = h if group is None else zero
            hr = run(moe_mlp, (xn, inds, *gate, *up), packing, (0, 1))
            run(moe_down, (hr, inds, scores, *down, resid), down_packing, (0, 1, 2, 6))
            return _MoE(launches, False, group, zero)
        se = mlp.shared_experts
        (sgate, s_packing), (sup, _), (sdown, sdown_packing) = map(
            weights_of, (se.gate_proj, se.up_proj, se.down_proj)
        )
        h, xn, gates = run(norm_router_gates, norm_args, dict(eps=norm.eps), (0, 1))
        resid = h if group is None else zero
        gu_kw = {**packing, **{f"shared_{k}": v for k, v in s_packing.items()}, **router_kw}
        gu_args = (xn, gates, *gate, *up, *sgate, *sup, bias)
        hr, hs, inds, scores = run(moe_gate_up_route, gu_args, gu_kw, (0, 1))
        down_kw = {**down_packing, **{f"shared_{k}": v for k, v in sdown_packing.items()}}
        run(moe_down, (hr, inds, scores, *down, resid, hs, *sdown), down_kw, (0, 1, 2, 6, 7))
        return _MoE(launches, True, group, zero)
    except _Stock as why:
        return str(why)


# id(layer) -> (a weak reference to it, {step key: (weights, block or why not)})
_BLOCKS = layer_registry()


def _block(layer, x, r, routing: Routing):
    """The layer's prepared block for this step's shapes and dtypes (prepared on first use,
    and again when the layer's weights are no longer the arrays it read), or why not."""
    backend = _backend.current()
    blocks = blocks_of(_BLOCKS, layer)
    key = (x.shape, x.dtype, r.shape, r.dtype, backend)
    weights = _weights(layer, routing)
    entry = blocks.get(key)
    if entry is not None and all(map(operator.is_, weights, entry[0])):
        return entry[1]
    if entry is not None:  # new weights: every shape is prepared again
        blocks.clear()
    built = _build(layer, x, r, routing, backend)
    block: _MoE | softmax_layer.Block | _Dense | _Compiled | str = built
    if COMPILED and not isinstance(built, str) and getattr(built, "group", None) is None:
        block = _Compiled(built)  # a tensor-parallel block's all-sum stays eager
    blocks[key] = (weights, block)
    return block


def decode_plan(layer) -> dict[tuple, str]:
    """What the decode steps this layer has run with moe_block do, per step key (shapes,
    dtypes, backend): "kernel: a, b, c", "reference: a, b, c (why)", or "mlx-lm (why)"."""
    entry = _BLOCKS.get(id(layer))
    out = {}
    for key, (_, block) in (entry[1] if entry is not None and entry[0]() is layer else {}).items():
        if isinstance(block, str):
            out[key] = f"mlx-lm ({block})"
            continue
        names = ", ".join(p.kernel.name for p in block.launches)
        reasons = sorted({p.reason for p in block.launches if p.reason})
        out[key] = f"reference: {names} ({'; '.join(reasons)})" if reasons else f"kernel: {names}"
    return out


def moe_half(layer, x, r, routing: Routing = Routing()):
    """The MoE half of a decode step: the layer's output from x and the attention's r."""
    block = _block(layer, x, r, routing)
    if isinstance(block, str):  # outside the launches' regime: the rest of mlx-lm's layer
        return stock_moe(layer, x, r, routing)
    return block(x, r)


PATTERN = Pattern(
    name="moe_block",
    summary=(
        "decoder layer's MoE half at decode in three prepared launches: residual add + norm +"
        " router, experts' and shared expert's gate + up + SwiGLU, down projections + combine +"
        " residual add (the dense layer likewise)"
    ),
    fidelity="close",
    kernels=(
        norm_router_gates,
        moe_gate_up_route,
        norm_router,
        moe_mlp,
        moe_down,
        residual_norm,
        swiglu_mlp,
        softmax_router,
    ),
    check=check,
    make=make,
    paths=("decode",),
    part=(("moe", moe_half),),
)
