"""softmax_router: the softmax routing of Qwen3-MoE, Mixtral and gpt-oss, which mlx-lm runs
inside the MoE block's own __call__ (no gate module), after the gate (router) matmul and before
the experts.

- Qwen3-MoE (`softmax_first=True`): softmax over the experts (precise: float32 inside, the
  probabilities rounded to the gates' dtype); `argpartition(p, kth=-k)[..., -k:]`; the scores
  gathered; with `norm_topk_prob`, divided by their sum (in the gates' dtype).
- Mixtral (`softmax_first=False`): `argpartition(-gates, kth=k-1)[..., :k]`; the k logits
  gathered; their softmax (precise).
- gpt-oss (`softmax_first=False, topk_last=True`, its `mlx_topk`): `argpartition(gates,
  kth=-k)[..., -k:]`; the k logits gathered; their softmax (precise).
`topk_last` is the top-k's convention: the last k of the ascending sort (Qwen3-MoE, gpt-oss)
or the first k of the ascending sort of the negated values (Mixtral); left None, the one
stock uses with that softmax order (last for Qwen3-MoE, first for Mixtral).

The kernel does either in one launch, one 32-lane warp per token, and follows MLX's CUDA
arithmetic, read from its sources (mlx/backend/cuda/softmax.cu, reduce/row_reduce.cu,
sort.cu), so that it is bitwise stock there:
- the softmax is MLX's kernel for a row of at most 32 * N values (N = 16 / itemsize: one
  block of 32 threads): lane l holds values l * N .. (out of range: -inf), its max from
  -FLT_MAX and online sum of __expf(x - max), a butterfly max and sum over the warp, the
  block's stage, then exp(x - max) * (1 / sum) rounded to the dtype;
- `argpartition` on the GPU is a full stable merge sort (NaN last): Qwen3-MoE's and gpt-oss's
  k are the last k of the ascending sort, in ascending order (of equal values the lower index
  first, so the higher index is chosen at the boundary); Mixtral's the first k of the
  ascending sort of -gates (of equal logits the lower index first). The index order matters:
  the block's weighted sum over the k adds in that order, and the softmax of the k (Mixtral,
  gpt-oss) reduces the row in that order;
- the sum of the k scores is MLX's row reduce in the dtype (each lane adds N values in
  order from 0, then a butterfly sum), and the division is the dtype's own.
On Metal the body is the same, but MLX's Metal softmax reduces in another order (and with
its fast exp), so the probabilities may differ in the last bit there: close, not exact.

Device code: csrc/moe_router.h (MLX's sort orders `zmlx_less`/`zmlx_before`),
csrc/softmax_router.h (the warp softmax and the choice order) and csrc/softmax_router_body.h
(the body).
"""

from __future__ import annotations

import math

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code


def _top_k(values, top_k, last):
    if last:  # Qwen3MoeSparseMoeBlock's, gpt-oss's mlx_topk
        return mx.stop_gradient(mx.argpartition(values, kth=-top_k, axis=-1)[..., -top_k:])
    # MixtralSparseMoeBlock's
    return mx.stop_gradient(mx.argpartition(-values, kth=top_k - 1, axis=-1)[..., :top_k])


def _softmax_first(gates, top_k, norm_topk_prob, last):
    # mlx-lm's Qwen3MoeSparseMoeBlock, op by op
    gates = mx.softmax(gates, axis=-1, precise=True)
    inds = _top_k(gates, top_k, last)
    scores = mx.take_along_axis(gates, inds, axis=-1)
    if norm_topk_prob:
        scores = scores / mx.sum(scores, axis=-1, keepdims=True)
    return inds, scores


def _topk_first(gates, top_k, last):
    # mlx-lm's MixtralSparseMoeBlock and gpt-oss's MLPBlock (mlx_topk), op by op
    inds = _top_k(gates, top_k, last)
    scores = mx.take_along_axis(gates, inds, axis=-1)
    return inds, mx.softmax(scores, axis=-1, precise=True)


def topk_last_of(softmax_first: bool, topk_last: bool | None) -> bool:
    """The top-k's convention: `topk_last`, or where None the one stock uses with that
    softmax order (Qwen3-MoE: the last k; Mixtral: the first k of the negated)."""
    return bool(softmax_first) if topk_last is None else bool(topk_last)


def reference(
    gates: mx.array,
    bias: mx.array | None = None,
    *,
    top_k: int,
    softmax_first: bool,
    norm_topk_prob: bool = False,
    topk_last: bool | None = None,
) -> tuple[mx.array, mx.array]:
    """gates (..., E) -> (inds (..., k) uint32, scores (..., k) in the gates' dtype), by
    stock's op sequence (not compiled: mlx-lm does not compile it). `bias`: the router's bias,
    added to the gates first (gpt-oss's quantized router: its QuantizedLinear's add)."""
    if bias is not None:
        gates = gates + bias
    last = topk_last_of(softmax_first, topk_last)
    if softmax_first:
        return _softmax_first(gates, top_k, norm_topk_prob, last)
    return _topk_first(gates, top_k, last)


_DTYPES = (mx.bfloat16, mx.float16, mx.float32)
MAX_TOP_K = 16


def shape_reason(experts: int, top_k: int, dtype) -> str | None:
    """Why the kernel does not take this routing, or None: MLX's softmax of the row in one
    warp (at most 32 * 16 / itemsize experts: 256 in 16-bit, 128 in float32), k <= 16."""
    if dtype not in _DTYPES:
        return f"gates {dtype}"
    most = 32 * (16 // dtype.size)
    if not (1 <= experts <= most and 1 <= top_k <= min(MAX_TOP_K, experts)):
        return (
            f"{experts} experts, top-{top_k} in {dtype} (the kernel takes <= {most} experts, "
            f"top-k <= {MAX_TOP_K}: MLX's softmax of one warp)"
        )
    return None


def launch(
    backend, gates, bias=None, *, top_k, softmax_first, norm_topk_prob=False, topk_last=None
) -> Launch | Skip:
    if gates.ndim < 2:  # MLX reduces a 1-D row with its all-reduce, not the row reduce
        return Skip(f"gates of {gates.ndim} dimension(s)")
    e = gates.shape[-1]
    if bias is not None and (bias.shape != (e,) or bias.dtype != gates.dtype):
        return Skip(f"a bias of {bias.shape} {bias.dtype} (the kernel takes ({e},) in the gates' dtype)")
    if (why := shape_reason(e, top_k, gates.dtype)) is not None:
        return Skip(why)
    rows = math.prod(gates.shape[:-1])
    if rows == 0:
        return Skip("no tokens")
    return Launch(
        inputs=[gates, gates if bias is None else bias],  # no bias: the gates again, never read
        template=[
            ("T", gates.dtype),
            ("BIAS", bias is not None),
            ("E", e),
            ("K", top_k),
            ("N", 16 // gates.dtype.size),
            ("ROWS", rows),
            ("SOFTMAX_FIRST", bool(softmax_first)),
            ("NORM", bool(softmax_first and norm_topk_prob)),
            ("LAST", topk_last_of(softmax_first, topk_last)),
        ],
        grid=(rows * 32, 1, 1),
        threadgroup=(32 * min(8, rows), 1, 1),
        output_shapes=[gates.shape[:-1] + (top_k,)] * 2,
        output_dtypes=[mx.uint32, gates.dtype],
    )


def example():
    # Qwen3-MoE's routing on 3 tokens of 128 experts, well separated logits (the Metal
    # self-check compares within a tolerance: no near-tie may flip an expert there).
    rows = [mx.random.permutation(128, key=mx.random.key(61 + r)) for r in range(3)]
    gates = (mx.stack(rows).astype(mx.float32) / 8 - 8).astype(mx.bfloat16)  # exact in bf16
    return (gates,), dict(top_k=8, softmax_first=True, norm_topk_prob=True)


softmax_router = KernelDef(
    name="softmax_router",
    reference=reference,
    fidelity="close",
    tolerance=1e-2,
    exact_on=("cuda",),
    body=device_code("softmax_router_body.h"),
    header=device_code("moe_router.h", "softmax_router.h"),
    input_names=("gates", "bias"),
    output_names=("inds", "scores"),
    launch=launch,
    example=example,
)
