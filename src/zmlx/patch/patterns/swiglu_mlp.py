"""swiglu_mlp: a dense MLP's gate + up + SwiGLU in one launch at decode.

Patches the family's dense MLP class (on glm4_moe_lite: `Glm4MoeLiteMLP`, the shared
expert of every MoE layer and the first, dense layer). For a decode step the fused
`swiglu_mlp` kernel replaces the two quantized matmuls and the activation; the down
projection stays mlx-lm's. Prompts take mlx-lm's own method. Exact on CUDA (the kernel
follows MLX's qmv), close on Metal; off by default until the ledger shows it faster.
"""

from __future__ import annotations

from functools import cache

from zmlx.distributed import row_sharded_reason
from zmlx.kernels.quant import weights_of
from zmlx.kernels.swiglu_mlp import swiglu_mlp
from zmlx.patch.pattern import Pattern


def check(mlp, params) -> str | None:
    for name in ("gate_proj", "up_proj"):
        # tensor parallel: all-to-sharded rows (this process's slice); down_proj stays mlx-lm's
        if (why := row_sharded_reason(name, getattr(mlp, name, None))) is not None:
            return why
    if weights_of(mlp.gate_proj)[1] != weights_of(mlp.up_proj)[1]:
        return "gate_proj and up_proj are quantized differently"
    return None


@cache
def make():
    def __call__(self, x):
        if x.shape[-2] != 1:  # a prompt: mlx-lm's own path
            return type(self).__zmlx_original__.__call__(self, x)
        gate, packing = weights_of(self.gate_proj)
        up, _ = weights_of(self.up_proj)
        return self.down_proj(swiglu_mlp(x, *gate, *up, **packing))

    return __call__


PATTERN = Pattern(
    name="swiglu_mlp",
    summary=(
        "dense MLPs at decode (shared expert, first layer): gate + up + SwiGLU in one launch"
        " (affine 4/8-bit or unquantized)"
    ),
    fidelity="close",
    kernels=(swiglu_mlp,),
    check=check,
    make=make,
    paths=("decode",),
)
