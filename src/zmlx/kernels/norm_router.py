"""norm_router: the residual add, the RMSNorm and the MoE router in one launch (decode;
launch 1 of the moe_block).

Stock (mlx-lm `glm4_moe_lite`: the decoder layer, then `MoEGate`):

    h     = x + r                                   # in T
    xn    = mx.fast.rms_norm(h, norm_w, eps)        # post_attention_layernorm, T
    gates = xn @ gate_w.T                           # unquantized (E, D) weight in T -> T
    inds, scores = group_expert_select(gates, ...)  # sigmoid, bias for selection, top-k, ...

Fused, two KernelDefs over one body (csrc/norm_router_body.h, its mode ZMLX_ROUTE):
- `norm_router`: one threadgroup per token recomputes h and its RMS in MLX's rms_norm order
  (residual_norm's geometry; threads past its BLOCK add +0.0 where MLX's reduction has its
  zero fill), writes h and xn and keeps xn in threadgroup memory, computes the E gate dots
  (warps split the experts) rounded to T, and one warp routes with moe_router's arithmetic
  (csrc/moe_router.h's `zmlx_route_warp`).
- `norm_router_gates` (`route=False`): no routing; the gate dots spread over E / GPT
  threadgroups per token (one SM for 64 dots of 2048 is the slow part), each recomputing h
  and the RMS (the same values in every group) and writing its experts' gates (..., E) in
  T; threadgroup 0 writes h and xn. moe_gate_up's `moe_gate_up_route` routes from them.

The gate matvec: MLX's CUDA `Matmul::eval_gpu` (mlx/backend/cuda/matmul.cpp) flattens
xn to (M, D) and calls `gemm_and_bias`, which takes `cu::gemv` (gemms/gemv.cu) when
`can_use_gemv`: M == 1 with the transposed weight view `gate_w.T`. That is `gemv_single`,
one warp per row: lane l sums n_per_thread values at n_per_thread * l + 32 * n_per_thread * r
into one float (fma), n_per_thread 4 / 2 / 1 from D % 128, D % 64 and the alignment of the
weight and of xn (a fresh array: aligned), then `cg::reduce` and a rounding to T. The kernel
runs that order through csrc/quant.h's `zmlx_qdot_lane` (BITS = 32). With more than one
token M > 1 and stock runs cuBLAS, whose order is not followed: on CUDA such calls take
the reference.

Fidelity: bitwise stock on CUDA (batch 1 decode); on Metal the dot is a plain float32 sum
(`close`). Group-limited routing (DeepSeek-V3) is moe_router's (csrc/moe_router.h's
`zmlx_limit_groups`); E > 256, k > 8 and groupings it does not take take the reference.

Device code: csrc/norm_router_body.h (the body); csrc/quant.h (the gemv-order dot),
csrc/residual_norm.h (the square-accumulate, and ZMLX_RMS_INV: the sums reduced, the rsqrt)
and csrc/moe_router.h (the routing) as its header.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from zmlx.kernels import moe_router
from zmlx.kernels.core import KernelDef, Launch, Skip, device_code, float_bits
from zmlx.kernels.residual_norm import geometry


def reference(
    x: mx.array,
    r: mx.array,
    norm_w: mx.array,
    gate_w: mx.array,
    bias: mx.array | None = None,
    *,
    eps: float,
    top_k: int | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    norm_topk_prob: bool = True,
    renorm_eps: float | None = None,
    route: bool = True,
) -> tuple[mx.array, ...]:
    """x, r (..., D) in T, norm_w (D,), gate_w (E, D), bias (E,) -> (h (..., D) T, xn (..., D) T,
    inds (..., k) uint32, scores (..., k) float32): mlx-lm's op sequence. route=False:
    (h, xn, gates (..., E) in T), the router's input (no bias, no routing)."""
    h = x + r
    xn = mx.fast.rms_norm(h, norm_w, eps)
    gates = xn @ gate_w.T
    if not route:
        return h, xn, gates
    if bias is None or top_k is None:
        raise TypeError("norm_router routes with a bias and a top_k")
    inds, scores = moe_router.reference(
        gates,
        bias,
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
        norm_topk_prob=norm_topk_prob,
        renorm_eps=renorm_eps,
    )
    return h, xn, inds, scores


_DTYPES = (mx.bfloat16, mx.float16, mx.float32)
# threadgroup memory the body may declare (xn, the gates, the sums): Metal's limit
_SHARED_BYTES = 32768
# threads per group for the gate dots (more warps split the experts), at least rms's BLOCK
_GATE_THREADS = 512
# route=False: experts per threadgroup (one warp each), so E / GPT threadgroups per token
GATES_PER_GROUP = 8


def launch(
    backend,
    x,
    r,
    norm_w,
    gate_w,
    bias=None,
    *,
    eps,
    top_k=None,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    norm_topk_prob=True,
    renorm_eps=None,
    route=True,
) -> Launch | Skip:
    if x.dtype not in _DTYPES or r.dtype != x.dtype or norm_w.dtype != x.dtype:
        return Skip(f"x {x.dtype}, r {r.dtype}, norm weight {norm_w.dtype} (one float dtype needed)")
    if gate_w.dtype != x.dtype:
        return Skip(f"gate weight {gate_w.dtype} (quantized, or not in x's dtype {x.dtype})")
    if x.ndim < 1 or r.shape != x.shape or norm_w.shape != x.shape[-1:]:
        return Skip(f"shapes x {x.shape}, r {r.shape}, norm weight {norm_w.shape}")
    d = x.shape[-1]
    if gate_w.ndim != 2 or gate_w.shape[1] != d:
        return Skip(f"gate weight {gate_w.shape} for rows of {d}")
    e = gate_w.shape[0]
    if route and (why := _route_reason(e, bias, top_k, n_group, topk_group)) is not None:
        return Skip(why)
    rows = math.prod(x.shape[:-1])
    if rows == 0 or d == 0 or e == 0:
        return Skip("empty input")
    if backend == "cuda" and rows > 1:
        return Skip(f"{rows} tokens: stock's gate matmul runs cuBLAS from 2 rows (only its gemv is followed)")
    geo = geometry(backend, d, x.dtype.size)
    if isinstance(geo, Skip):
        return geo
    block, chunks, nr = geo
    if chunks * nr > 64:
        return Skip(f"row of {d} needs {chunks * nr} values per thread")
    if d * x.dtype.size + 4 * ((e if route else 0) + 32) > _SHARED_BYTES:
        return Skip(f"row of {d} {x.dtype} does not fit in threadgroup memory")
    per_group = e if route else min(GATES_PER_GROUP, e)
    groups = -(-e // per_group)
    threads = max(block, min(_GATE_THREADS, 32 * per_group))
    template = [
        ("T", x.dtype),
        ("D", d),
        ("E", e),
        ("GROUPS", groups),
        ("GPT", per_group),
        ("BLOCK", block),
        ("CHUNKS", chunks),
        ("NR", nr),
        ("TG", threads),
        ("NORM_EPS_BITS", float_bits(eps)),
    ]
    lead = x.shape[:-1]
    spec = dict(grid=(rows * groups * threads, 1, 1), threadgroup=(threads, 1, 1))
    if not route:
        return Launch(
            inputs=[x, r, norm_w, gate_w],
            template=template,
            output_shapes=[x.shape, x.shape, lead + (e,)],
            output_dtypes=[x.dtype, x.dtype, x.dtype],
            **spec,
        )
    return Launch(
        inputs=[x, r, norm_w, gate_w, bias],
        template=template
        + [
            ("K", top_k),
            ("N_GROUP", n_group),
            ("TOPK_GROUP", topk_group if n_group > 1 else 1),
            ("NORM", top_k > 1 and bool(norm_topk_prob)),
            ("HAS_EPS", renorm_eps is not None),
            ("RENORM_EPS_BITS", float_bits(renorm_eps or 0.0)),
            ("SCALE_BITS", float_bits(routed_scaling_factor)),
        ],
        output_shapes=[x.shape, x.shape, lead + (top_k,), lead + (top_k,)],
        output_dtypes=[x.dtype, x.dtype, mx.uint32, mx.float32],
        **spec,
    )


def _route_reason(e, bias, top_k, n_group, topk_group) -> str | None:
    if bias is None or top_k is None:
        return "no bias or top_k to route with"
    if bias.dtype not in _DTYPES:
        return f"bias {bias.dtype}"
    if bias.shape != (e,):
        return f"bias {bias.shape} for {e} experts"
    if not (1 <= e <= 256 and 1 <= top_k <= min(8, e)):
        return f"{e} experts, top-{top_k} (the kernel takes <= 256 experts, top-k <= 8)"
    return moe_router.groups_reason(e, n_group, topk_group)


def inputs(lead, d, e, dtype, seed, *, ties=False):
    """Random (x, r, norm_w, gate_w, bias) at a decoder layer's scales. `ties`: a bias that is
    0 on half the experts, and on the rest a few coarse values, so that biased scores tie."""
    keys = mx.random.split(mx.random.key(seed), 5)
    x = mx.random.normal((*lead, d), key=keys[0]).astype(dtype)
    r = (0.5 * mx.random.normal((*lead, d), key=keys[1])).astype(dtype)
    norm_w = (1 + 0.1 * mx.random.normal((d,), key=keys[2])).astype(dtype)
    gate_w = (mx.random.normal((e, d), key=keys[3]) * d**-0.5).astype(dtype)
    bias = mx.random.normal((e,), key=keys[4]) * 0.05
    if ties:
        bias = mx.where(mx.arange(e) % 2 == 0, 0.0, mx.round(bias * 16) / 16)
    return x, r, norm_w, gate_w, bias


def example():
    # one token (CUDA's regime), an odd width (gemv with 2 values per lane) and 40 experts;
    # distinct biases and a seed whose top 5 biased scores are far apart (> 0.05), so that a
    # float32 Metal dot picks the same experts in the same order
    x, r, norm_w, gate_w, _ = inputs((1, 1), 320, 40, mx.bfloat16, 55)
    bias = ((mx.arange(40) * 17) % 40).astype(mx.float32) * 0.05
    kwargs = dict(eps=1e-5, top_k=4, routed_scaling_factor=1.8, norm_topk_prob=True, renorm_eps=1e-20)
    return (x, r, norm_w, gate_w, bias), kwargs


def gates_example():
    (x, r, norm_w, gate_w, _), kwargs = example()
    return (x, r, norm_w, gate_w), dict(eps=kwargs["eps"])


_HEADER = device_code("quant.h", "residual_norm.h", "moe_router.h")

norm_router = KernelDef(
    name="norm_router",
    reference=reference,
    fidelity="close",
    exact_on=("cuda",),  # bitwise stock's rms_norm + gemv + router where launch() takes the call
    tolerance=2**-3,  # the self-check only: a few roundings of T, far below a layout error
    body=device_code("norm_router_body.h"),
    header="#define ZMLX_ROUTE 1\n" + _HEADER,
    input_names=("x", "r", "norm_w", "gate_w", "bias"),
    output_names=("h", "xn", "inds", "scores"),
    launch=launch,
    example=example,
)

# The same body and reference without the routing (moe_block's launch 1 where moe_gate_up_route
# routes): the outputs differ, so it is a KernelDef of its own.
norm_router_gates = KernelDef(
    name="norm_router_gates",
    reference=functools.partial(reference, route=False),
    fidelity="close",
    exact_on=("cuda",),  # bitwise stock's rms_norm + gemv where launch() takes the call
    tolerance=2**-3,
    body=norm_router.body,
    header="#define ZMLX_ROUTE 0\n" + _HEADER,
    input_names=("x", "r", "norm_w", "gate_w"),
    output_names=("h", "xn", "gates"),
    launch=functools.partial(launch, route=False),
    example=gates_example,
)
