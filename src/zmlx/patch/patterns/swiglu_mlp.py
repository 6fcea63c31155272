"""swiglu_mlp: a dense MLP's gate + up + SwiGLU in one launch at decode.

Patches the family's dense MLP class (on glm4_moe_lite: `Glm4MoeLiteMLP`, the shared
expert of every MoE layer and the first, dense layer). For a decode step the fused
`swiglu_mlp` kernel replaces the two quantized matmuls and the activation; the down
projection stays mlx-lm's. Prompts take mlx-lm's own method. Exact on CUDA (the kernel
follows MLX's qmv), close on Metal; off by default until the ledger shows it faster.
"""

from __future__ import annotations

from functools import cache

from zmlx.kernels._quant import linear_reason
from zmlx.kernels.swiglu_mlp import swiglu_mlp
from zmlx.patch.pattern import Pattern


def check(mlp, params) -> str | None:
    for name in ("gate_proj", "up_proj"):
        if (why := linear_reason(name, getattr(mlp, name, None))) is not None:
            return why
    g, u = mlp.gate_proj, mlp.up_proj
    if (g.bits, g.group_size) != (u.bits, u.group_size):
        return "gate_proj and up_proj are quantized differently"
    return None


@cache
def make():
    def __call__(self, x):
        if x.shape[-2] != 1:  # a prompt: mlx-lm's own path
            return type(self).__zmlx_original__.__call__(self, x)
        g, u = self.gate_proj, self.up_proj
        h = swiglu_mlp(x, g["weight"], g["scales"], g["biases"], u["weight"], u["scales"], u["biases"],
                       group_size=g.group_size, bits=g.bits)
        return self.down_proj(h)

    return __call__


PATTERN = Pattern(
    name="swiglu_mlp",
    summary=("dense MLPs at decode (shared expert, first layer): gate + up + SwiGLU in one launch"
             " (affine 4/8-bit)"),
    fidelity="close",
    kernels=(swiglu_mlp,),
    check=check,
    make=make,
    paths=("decode",),
)
