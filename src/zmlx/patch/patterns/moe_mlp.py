"""moe_mlp: the routed experts' gate + up + SwiGLU in one launch at decode (close).

Patches `SwitchGLU.__call__`: for a decode step (one token per sequence) the fused
`moe_mlp` kernel replaces the two gathered matmuls and the activation; the down
projection stays mlx-lm's. Prompts, and decode steps of so many sequences that mlx-lm
sorts the rows by expert (MLX_LM_SORT_ROWS), take mlx-lm's own path. The launch is prepared
once per module and shapes (zmlx.patch.module_calls). Off by default
until the ledger shows it faster. gpt-oss's experts (biases, SwigluOAI) take the kernel's
variant that adds the gate and up biases and applies SwigluOAI as mlx-lm does (down_proj's
bias stays mlx-lm's add), affine, unquantized or mxfp4 as released (the dot's mxfp4
overload, the same arithmetic as moe_block's mxfp4 experts). SwiGLU experts stay affine or
unquantized here, as the other module patterns (moe_block takes their mxfp4).
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
from mlx_lm.models.activations import SwigluOAI

from zmlx.kernels.moe_mlp import moe_mlp
from zmlx.kernels.quant import AFFINE, MLX_LM_SORT_ROWS, MODES, switch_linear_reason, weights_of
from zmlx.patch import module_calls
from zmlx.patch.moe import experts_reason, gate_up, kernel_activations
from zmlx.patch.pattern import Pattern


def _experts_reason(switch) -> str | None:
    """experts_reason, less what the kernel's gpt-oss variant takes: SwigluOAI, with biases on
    both gate_proj and up_proj or on neither."""
    if not isinstance(switch.activation, SwigluOAI):
        return experts_reason(switch)
    if ("bias" in switch.gate_proj) != ("bias" in switch.up_proj):
        return "a bias on one of gate_proj and up_proj only"
    return None


def check(switch, params) -> str | None:
    if (why := _experts_reason(switch)) is not None:
        return why
    oai = isinstance(switch.activation, SwigluOAI)  # the kernel adds gpt-oss's biases
    modes = MODES if oai else AFFINE  # gpt-oss's released experts are mxfp4
    for name in ("gate_proj", "up_proj"):
        if (why := switch_linear_reason(name, getattr(switch, name), modes, bias=oai)) is not None:
            return why
    if weights_of(switch.gate_proj)[1] != weights_of(switch.up_proj)[1]:
        return "gate_proj and up_proj are quantized differently"
    return None


@cache
def make():
    @kernel_activations  # downproj_combine takes the activations from the kernel too
    def __call__(self, x, indices):
        if x.shape[-2] != 1 or indices.size >= MLX_LM_SORT_ROWS:  # a prompt, or rows mlx-lm sorts
            return type(self).__zmlx_original__.__call__(self, x, indices)
        gate, up, packing = gate_up(self)
        act = self.activation
        if isinstance(act, SwigluOAI):  # gpt-oss
            biases = (self.gate_proj.get("bias"), self.up_proj.get("bias"))
            kw = dict(packing, oai=(act._alpha, act._limit))
            h = module_calls.call(self, moe_mlp, (x, indices, *gate, *up, *biases), kw, (0, 1))
        else:
            h = module_calls.call(self, moe_mlp, (x, indices, *gate, *up), packing, (0, 1))
        return self.down_proj(mx.expand_dims(h, -2), indices).squeeze(-2)

    return __call__


PATTERN = Pattern(
    name="moe_mlp",
    summary="routed experts at decode: gate + up (+ biases) + SwiGLU or SwigluOAI in one launch",
    fidelity="close",
    kernels=(moe_mlp,),
    check=check,
    make=make,
    paths=("decode",),
)
