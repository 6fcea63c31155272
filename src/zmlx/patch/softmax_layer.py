"""moe_block's MoE half for the blocks that route with a softmax in their own `__call__`
(zmlx.patch.softmax_moe): Qwen3-MoE's `Qwen3MoeSparseMoeBlock` and gpt-oss's `MLPBlock`. The
family data names the routing (`softmax_first`, `topk_last`: zmlx.patch.layer.Routing). A
decode step runs

    residual_norm    h = x + r, xn = post_attention_layernorm(h)          (prepared launch)
    the gate module  mlx-lm's own Linear (gpt-oss's router with its bias): its matmul
    softmax_router   the block's routing from the gates                    (prepared launch)
    moe_mlp          the routed experts' gate + up + SwiGLU (gpt-oss: the biases and
                     SwigluOAI, affine, unquantized or mxfp4)               (prepared launch)
    Qwen3-MoE:       moe_down: the down projections, the weighted sum (scores in T) and the
                     residual add                                          (prepared launch)
    gpt-oss:         mlx-lm's ops: the experts' down projection with its bias, the weighted
                     sum and the residual add; with OAI_DOWN, moe_down with the experts'
                     biases (prepared launch: six stock launches in one)

Each launch is stock's op sequence bitwise on CUDA (its own `cuda` tests), so the block is
too: tests/patch/test_moe_block_softmax.py checks it against mlx-lm's layer (on the CPU their
references; on the GPU the kernels).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from zmlx.kernels.moe_down import moe_down
from zmlx.kernels.moe_mlp import moe_mlp
from zmlx.kernels.quant import weights_of
from zmlx.kernels.residual_norm import residual_norm
from zmlx.kernels.softmax_router import softmax_router
from zmlx.patch import softmax_moe
from zmlx.patch.patterns import moe_mlp as moe_mlp_pattern

# gpt-oss's down half (the experts' down projection with their biases, the weighted sum, the
# residual add) in moe_down: on since its cuda tests passed on the H200
# (tests/kernels/test_moe_down_bias.py, tests/patch/test_moe_block_softmax.py;
# switch_checks.sh oai-down), 2026-12-02
OAI_DOWN = True

# gpt-oss's quantized router's bias added in softmax_router (its `bias` input) instead of by
# the router's QuantizedLinear (one launch fewer a layer): off until its cuda tests run on a
# GPU (tests/kernels/test_softmax_router.py's bias cases, test_moe_block_softmax.py's
# router-bias test; switch_checks.sh router-bias)
ROUTER_BIAS = False


def parts(mlp) -> tuple:
    """(gate module, experts' SwitchGLU, whether they are gpt-oss's) of a softmax-routed block."""
    if "router" in mlp:  # gpt-oss's MLPBlock
        return mlp["router"], mlp["experts"], True
    return mlp["gate"], mlp["switch_mlp"], False


def reason(mlp, routing, switch_reason) -> str | None:
    """Why this softmax-routed block does not fit, or None. `switch_reason`: moe_block's
    checks of bias-free SwiGLU experts (Qwen3-MoE's, whose down projection moe_down takes)."""
    gate, experts, oai = parts(mlp)
    if not isinstance(gate, (nn.Linear, nn.QuantizedLinear)):
        return "a softmax-routed block without a Linear gate"
    try:
        softmax_moe.routing(mlp, softmax_moe.kind_of(routing.softmax_first, routing.topk_last))
    except AttributeError as e:
        return f"a softmax-routed block without its routing's attributes ({e})"
    if oai:  # the experts as moe_mlp takes them; their down projection stays mlx-lm's
        return moe_mlp_pattern.check(experts, {})
    return switch_reason(experts)


def _linear(m) -> tuple:
    return (m["weight"], m.get("scales"), m.get("biases"), m.get("bias"))


def weights(mlp) -> tuple:
    """The arrays the block's launches and gate read (a prepared block holds for these only)."""
    gate, experts, _ = parts(mlp)
    return (*_linear(gate), *(a for n in ("gate_proj", "up_proj", "down_proj") for a in _linear(experts[n])))


class Block:
    """A softmax-routed MoE layer's prepared launches (norm, route, gate_up, and Qwen3-MoE's
    down), mlx-lm's gate module between norm and route, and the down half (a prepared
    moe_down, or gpt-oss's mlx-lm ops)."""

    __slots__ = ("launches", "gate", "down", "group", "zero")

    def __init__(self, launches, gate, down, group=None, zero=None):
        self.launches, self.gate, self.down = tuple(launches), gate, down
        self.group, self.zero = group, zero  # tensor parallel: as moe_block's _MoE

    def __call__(self, x, r):
        norm, route, gate_up = self.launches[:3]
        h, xn = norm(x, r)
        inds, scores = route(self.gate(xn))
        y = self.down(gate_up(xn, inds), inds, scores, h if self.group is None else self.zero)
        return y if self.group is None else h + mx.distributed.all_sum(y, group=self.group)


class BiasFree:
    """A quantized router's matmul without its bias add, as its QuantizedLinear computes it:
    softmax_router adds the bias (ROUTER_BIAS)."""

    __slots__ = ("gate",)

    def __init__(self, gate):
        self.gate = gate

    def __call__(self, x):
        g = self.gate
        return mx.quantized_matmul(
            x,
            g["weight"],
            scales=g["scales"],
            biases=g.get("biases"),
            transpose=True,
            group_size=g.group_size,
            bits=g.bits,
            mode=g.mode,
        )


def _router_bias(gate, x) -> bool:
    """Whether softmax_router takes this router's bias: a quantized router whose bias is in
    the activations' dtype (its add then stays in that dtype, as the kernel's does)."""
    return (
        ROUTER_BIAS
        and isinstance(gate, nn.QuantizedLinear)
        and "bias" in gate
        and gate["bias"].dtype == x.dtype
    )


class OaiDown:
    """gpt-oss's experts from their activations on, as mlx-lm runs them: the down projection
    (SwitchLinear, with its bias), the weighted sum, the residual add."""

    __slots__ = ("proj",)

    def __init__(self, proj):
        self.proj = proj

    def __call__(self, hr, inds, scores, resid):
        y = self.proj(mx.expand_dims(hr, -2), inds).squeeze(-2)
        return resid + (y * mx.expand_dims(scores, axis=-1)).sum(axis=-2)


def build(layer, x, r, routing, run, launches: list, group, zero) -> Block:
    """The layer's launches prepared for x and r through moe_block's `run` (which appends
    each to `launches`, and raises when one skips)."""
    norm, mlp = layer["post_attention_layernorm"], layer[routing.mlp_name]
    gate, experts, oai = parts(mlp)
    route_kw = softmax_moe.routing(mlp, softmax_moe.kind_of(routing.softmax_first, routing.topk_last))
    (gw, packing), (uw, _) = weights_of(experts.gate_proj), weights_of(experts.up_proj)
    h, xn = run(residual_norm, (x, r, norm["weight"], norm.eps), {}, (0, 1))
    if _router_bias(gate, xn):
        gate = BiasFree(gate)
        inds, scores = run(softmax_router, (gate(xn), gate.gate["bias"]), route_kw, (0,))
    else:
        inds, scores = run(softmax_router, (gate(xn),), route_kw, (0,))
    if oai:
        act = experts.activation
        biases = (experts.gate_proj.get("bias"), experts.up_proj.get("bias"))
        hr = run(moe_mlp, (xn, inds, *gw, *uw, *biases), dict(packing, oai=(act._alpha, act._limit)), (0, 1))
        if not OAI_DOWN:
            return Block(launches, gate, OaiDown(experts["down_proj"]), group, zero)
        down, down_packing = weights_of(experts.down_proj)
        ebias = experts.down_proj.get("bias")
        args = (hr, inds, scores, *down, h if group is None else zero, None, None, None, None, ebias)
        run(moe_down, args, down_packing, (0, 1, 2, 6))
        return Block(launches, gate, launches[3], group, zero)
    hr = run(moe_mlp, (xn, inds, *gw, *uw), packing, (0, 1))
    down, down_packing = weights_of(experts.down_proj)
    run(moe_down, (hr, inds, scores, *down, h if group is None else zero), down_packing, (0, 1, 2, 6))
    return Block(launches, gate, launches[3], group, zero)
