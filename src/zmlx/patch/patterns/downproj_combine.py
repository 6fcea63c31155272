"""downproj_combine: the experts' down projection + routing weights + shared expert (close).

Patches the MoE block's `__call__` (the method `moe_combine` patches, so it is registered
before it and wins when both are chosen; the report then says moe_combine was skipped).
At decode (one token per sequence) the experts' hidden activations h come from mlx-lm's
gate/up projections and SwiGLU, or from the `moe_mlp` kernel when the block's SwitchGLU is
patched by `moe_mlp`; then one `downproj_combine` launch gives the block's output (both
prepared once per module and shapes: zmlx.patch.module_calls).
Prompts take the stock expert path with the moe_combine kernel. Off by default until the
ledger shows it correct and faster.

On the softmax-routed blocks (Qwen3-MoE, Mixtral: the family data names `softmax_first`) it
is the "combine" piece of zmlx.patch.softmax_moe's shared `__call__` (softmax_router supplies
the routing): at decode, in the kernel's regime, the experts' activations then one
`downproj_combine` launch with the router's scores in the activations' dtype; otherwise
mlx-lm's experts and weighted sum.
"""

from __future__ import annotations

from functools import cache

from zmlx.distributed import moe_input, moe_output
from zmlx.kernels.downproj_combine import downproj_combine
from zmlx.kernels.moe_combine import moe_combine
from zmlx.kernels.moe_mlp import moe_mlp
from zmlx.kernels.quant import MLX_LM_SORT_ROWS, switch_linear_reason, weights_of
from zmlx.patch import module_calls, softmax_moe
from zmlx.patch.moe import gate_up, has_kernel_activations, shared_expert, stock_activations
from zmlx.patch.pattern import Pattern


def check(moe, params) -> str | None:
    # tensor-parallel MoEs too: each process's slice of the experts' width, then mlx-lm's all-sum
    return switch_linear_reason("down_proj", moe.switch_mlp.down_proj)


def _hidden(sw, x, inds):
    """The experts' SwiGLU activations (..., k, I), through moe_mlp's kernel when the
    SwitchGLU is patched by moe_mlp, else mlx-lm's own projections."""
    if has_kernel_activations(sw):
        gate, up, packing = gate_up(sw)
        return module_calls.call(sw, moe_mlp, (x, inds, *gate, *up), packing, (0, 1))
    return stock_activations(sw, x, inds)


def combine(block, x, inds, scores, kind):
    """downproj_combine's piece of a softmax-routed block (zmlx.patch.softmax_moe)."""
    sw = block["switch_mlp"]
    if x.shape[-2] != 1 or inds.size >= MLX_LM_SORT_ROWS:  # a prompt, or rows mlx-lm sorts
        return softmax_moe.stock_combine(block, x, inds, scores, kind)
    down, packing = weights_of(sw.down_proj)
    args = (_hidden(sw, x, inds), inds, scores, *down, None)
    return module_calls.call(block, downproj_combine, args, packing, (0, 1, 2))


def make(
    shared_overlap: bool = False,
    softmax_first: bool | None = None,
    topk_last: bool | None = None,
    route=None,
    combine=None,
):
    """GLM's and DeepSeek's MoE block `__call__`, or a softmax-routed block's (the family
    data names `softmax_first`) with this pattern's combine piece."""
    if softmax_first is not None:
        return softmax_moe.make(softmax_first, topk_last, route, combine)
    return _gate_module_call(shared_overlap)


@cache
def _gate_module_call(shared_overlap: bool):
    def __call__(self, x):
        x = moe_input(self, x)
        inds, scores = self.gate(x)
        shared = shared_expert(self, x, shared_overlap)
        sw = self.switch_mlp
        if x.shape[-2] != 1 or inds.size >= MLX_LM_SORT_ROWS:  # a prompt, or rows mlx-lm sorts:
            return moe_output(self, moe_combine(sw(x, inds), scores, shared))  # stock experts, fused combine
        down, packing = weights_of(sw.down_proj)
        args = (_hidden(sw, x, inds), inds, scores, *down, shared)
        y = module_calls.call(
            self, downproj_combine, args, packing, (0, 1, 2) if shared is None else (0, 1, 2, 6)
        )
        return moe_output(self, y)

    return __call__


PATTERN = Pattern(
    name="downproj_combine",
    summary="MoE block at decode: experts' down projection + routing weights + shared expert in one launch",
    fidelity="close",
    kernels=(downproj_combine, moe_combine),
    check=check,
    make=make,
    paths=("decode",),
    options=("shared_overlap",),
    part=(("combine", combine),),
)
