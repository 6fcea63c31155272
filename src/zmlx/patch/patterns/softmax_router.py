"""softmax_router: the softmax routing of Qwen3-MoE's, Mixtral's and gpt-oss's MoE blocks in one
launch (exact on CUDA and the CPU, close on Metal).

Patches the block's `__call__` (Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock, gpt-oss's
MLPBlock): mlx-lm's own code in its order, with the ops between the gate matmul and the
experts (the softmax, argpartition and its slice, take_along_axis, and Qwen3-MoE's sum and
divide) replaced by the softmax_router kernel: its "route" piece of zmlx.patch.softmax_moe's
shared `__call__`. The gate, the experts (switch_mlp, which moe_mlp patches; gpt-oss's biased
SwitchGLU) and the weighted sum stay mlx-lm's calls, or downproj_combine's "combine" piece. gpt-oss's
router is an nn.Linear with a bias: it stays mlx-lm's call (addmm, or quantized_matmul then
the add), since fusing it into the kernel would round its output otherwise than stock's
matmul does. Prompts and decode steps alike. The family data says which routing a block runs
(`softmax_first`: Qwen3-MoE's softmax over the experts, then top-k; Mixtral's and gpt-oss's
top-k of the logits, then their softmax; `topk_last`: gpt-oss's top-k is the last k of the
ascending sort, in that order, as Qwen3-MoE's; Mixtral's the first k of the sort of -gates)."""

from __future__ import annotations

from zmlx.kernels.softmax_router import shape_reason, softmax_router, topk_last_of
from zmlx.patch import module_calls, softmax_moe
from zmlx.patch.pattern import Pattern

# (softmax_first, topk_last) -> the block's name, the attributes its stock __call__ reads (the
# gate, the experts, k) and whether its gate has a bias
_BLOCKS = {
    (True, True): ("Qwen3-MoE", ("gate", "switch_mlp", "top_k", "norm_topk_prob"), False),
    (False, False): ("Mixtral", ("gate", "switch_mlp", "num_experts_per_tok"), False),
    (False, True): ("gpt-oss", ("router", "experts", "num_experts_per_tok"), True),
}


def _kind(params) -> tuple[bool, bool] | None:
    softmax_first = params.get("softmax_first")
    if softmax_first is None:
        return None
    return bool(softmax_first), topk_last_of(softmax_first, params.get("topk_last"))


def check(block, params) -> str | None:
    kind = _kind(params)
    if kind is None:
        return "the family data names no routing (softmax_first)"
    if kind not in _BLOCKS:
        return f"no mlx-lm block routes with softmax_first={kind[0]}, topk_last={kind[1]}"
    _, attrs, biased = _BLOCKS[kind]
    missing = [a for a in attrs if not hasattr(block, a)]
    if missing:
        return f"{type(block).__name__} has no {', '.join(missing)}: not mlx-lm's sparse MoE block"
    gate, top_k = getattr(block, attrs[0]), getattr(block, attrs[2])
    if "weight" not in gate or ("bias" in gate) != biased:
        return f"{attrs[0]} is a {type(gate).__name__} {'without' if biased else 'with'} a bias or weights"
    # the gates' dtype: the bias's where it has one (added last), else the matmul's
    scales = gate["scales"] if "scales" in gate else None
    dtype = gate.bias.dtype if biased else scales.dtype if scales is not None else gate.weight.dtype
    return shape_reason(gate.weight.shape[0], top_k, dtype)


def route(block, gates, kind):
    """softmax_router's piece of the block (zmlx.patch.softmax_moe): the routing in one launch."""
    return module_calls.call(block, softmax_router, (gates,), softmax_moe.routing(block, kind), (0,))


PATTERN = Pattern(
    name="softmax_router",
    summary="Qwen3-MoE / Mixtral / gpt-oss MoE block: softmax, top-k, gather (and renormalize) in one launch",
    fidelity="close",
    kernels=(softmax_router,),
    check=check,
    make=softmax_moe.make,
    part=(("route", route),),
)
