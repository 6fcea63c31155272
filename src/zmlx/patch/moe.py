"""What the MoE block patterns (moe_combine, downproj_combine, moe_mlp) share: the shared
expert (on a second stream when asked), the experts' SwiGLU activations the stock way, the
gate and up weights the moe_mlp kernel reads, and which SwitchGLUs compute their
activations with that kernel. Each pattern calls its kernels itself."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
from mlx_lm.models.switch_layers import SwiGLU

from zmlx.kernels.moe_router import groups_reason
from zmlx.kernels.quant import weights_of

_SIDE_STREAMS: dict[str, mx.Stream] = {}


def shared_expert(moe, x, overlap: bool):
    """The block's shared expert output (None without one); with `overlap`, on a second
    stream of the default device (MLX orders the streams where one reads the other)."""
    if moe.config.n_shared_experts is None:
        return None
    if not overlap:
        return moe.shared_experts(x)
    device = mx.default_device()
    stream = _SIDE_STREAMS.get(str(device))
    if stream is None:
        stream = _SIDE_STREAMS[str(device)] = mx.new_stream(device)
    with mx.stream(stream):
        return moe.shared_experts(x)


def router_reason(gate) -> str | None:
    """Why an MoE block's router is not the DeepSeek-style one that moe_router and moe_block's
    norm_router compute (sigmoid scores plus a correction bias for selection, noaux_tc top-k,
    in one group or group-limited as DeepSeek-V3's), or None. Softmax routers (Qwen3-MoE,
    Mixtral, gpt-oss) route inside the block's own __call__, with no gate module that returns
    (inds, scores): the softmax_router pattern patches Qwen3-MoE's, Mixtral's and gpt-oss's blocks instead."""
    if not hasattr(gate, "e_score_correction_bias"):
        return (
            f"router is a {type(gate).__name__}: softmax routing inside the MoE block "
            "(only the sigmoid MoEGate with a correction bias is fused here; softmax_router fuses "
            "Qwen3-MoE's, Mixtral's and gpt-oss's)"
        )
    if getattr(gate.config, "topk_method", "noaux_tc") != "noaux_tc":
        return f"topk_method {gate.config.topk_method!r} (only noaux_tc is fused)"
    if getattr(gate.config, "scoring_func", "sigmoid") != "sigmoid":
        return f"scoring_func {gate.config.scoring_func!r} (only sigmoid is fused)"
    # groupings the kernels do not take would run their references (stock's own ops): nothing to gain
    return groups_reason(gate.weight.shape[0], gate.n_group, gate.topk_group)


def experts_reason(switch) -> str | None:
    """Why a SwitchGLU's experts are not what the expert kernels compute (bias-free
    projections, mlx-lm's SwiGLU), or None: gpt-oss's experts have biases and its clamped
    SwiGLU (SwigluOAI)."""
    biased = [p for p in ("gate_proj", "up_proj", "down_proj") if "bias" in getattr(switch, p)]
    if biased:
        return f"experts have biases ({', '.join(biased)}); the expert kernels take bias-free projections"
    if not isinstance(switch.activation, SwiGLU):
        return f"activation {type(switch.activation).__name__} (only SwiGLU is fused)"
    return None


def gate_up(switch) -> tuple[tuple, tuple, dict]:
    """(gate weights, up weights, packing) of a SwitchGLU, as the moe_mlp kernel takes them
    (the two are quantized alike: moe_mlp's check says so)."""
    gate, packing = weights_of(switch.gate_proj)
    up, _ = weights_of(switch.up_proj)
    return gate, up, packing


def stock_activations(switch, x, indices):
    """The experts' SwiGLU activations (..., k, I) through mlx-lm's own projections."""
    xe = mx.expand_dims(x, (-2, -3))
    return switch.activation(switch.up_proj(xe, indices), switch.gate_proj(xe, indices)).squeeze(-2)


# SwitchGLU.__call__ replacements whose activations come from the moe_mlp kernel at decode
# (the moe_mlp pattern marks its own): a block that downproj_combine patches then takes its
# activations from the same kernel, so that both patterns together compute what moe_mlp alone
# computes before the down projection.
_KERNEL_ACTIVATIONS: set[Callable] = set()


def kernel_activations(fn: Callable) -> Callable:
    """Marks `fn` (a SwitchGLU.__call__ replacement) as computing the activations with the
    moe_mlp kernel; returns it."""
    _KERNEL_ACTIVATIONS.add(fn)
    return fn


def has_kernel_activations(switch) -> bool:
    """Whether `switch` is patched with a replacement that `kernel_activations` marked."""
    return getattr(type(switch), "__call__", None) in _KERNEL_ACTIVATIONS
