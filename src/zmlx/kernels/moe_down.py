"""moe_down: the routed experts' down projection, the routing weights, the shared expert's
down projection and the decoder layer's residual add in one launch (decode; launch 3 of the
moe_block). A dense variant does a dense MLP's down projection and the residual add.

Stock (mlx-lm `Glm4MoeLiteMoE` from its down projections on, then
`Glm4MoeLiteDecoderLayer`'s `h + r`):

    y   = gather_qmm(h, down_w, ..., rhs_indices=inds)     # (..., k, D), rounded to T
    y   = (y * scores[..., None]).sum(-2).astype(T)
    y   = y + quantized_matmul(hs, sdown_w, ...)           # the shared expert's down, in T
    out = resid + y                                        # in T
    dense layer (Glm4MoeLiteMLP): out = resid + quantized_matmul(h, down_w, ...)

Fused: downproj_combine's warp per output value (token, d) goes on: after the k routed
rows (each rounded to T, weighted and summed in moe_combine's order, rounded to T) the same
warp dots the shared expert's row d with hs (its own packing), rounds it to T and adds it
as stock does, then lane 0 adds the residual. No intermediate is written; five stock
launches (two matmuls, the combine, two adds) become one.

Fidelity: on CUDA the dots are MLX's qmv's arithmetic (gemv's for unquantized weights;
csrc/quant.h) and the adds round as MLX's, so the kernel is bitwise stock wherever stock
runs its matvecs: fewer than 8 expert rows for the routed experts and one token for a dense
down projection (the shared expert's, the dense layer's: a dense quantized_matmul leaves
qmv from 2 rows on sm90; mxfp4 from 8); other calls take the reference. Weights are affine,
mxfp4 or unquantized, each set on its own. From 8 expert rows stock's gather_qmm runs
qmm_sm80 on affine weights of its tile shapes: with quant.QMM_ORDER and QMM_BLOCK the routed
rows follow that order there (QMM: downproj_combine's block of k warps per 8 outputs, a warp
an expert, each dot an mma chain in stock's k-order rounded to T; the shared expert's rows,
one token's dense matmul and so stock's qmv still, by whole warps in qmv's arithmetic; then
the same combine, shared add and residual add, op for op, as one warp does them here; PIPE
with quant.QMM_PIPELINED); QMM_BLOCK off, those calls skip. On Metal the dot is a plain
float32 sum: `close`.

Expert biases (`ebias`, (E, D): gpt-oss's down projection, a SwitchLinear with a bias): each
routed row, rounded to T, gets its expert's bias added in T before the weighting, as mlx-lm's
SwitchLinear adds it; six stock launches (gather_qmm, the bias gather and add, the product,
the sum, the residual add) become one. Not with the QMM block (those calls skip).

Device code: csrc/moe_down_body.h; the dot is csrc/quant.h, the sum in stock's order
csrc/expert_sum.h, the QMM block csrc/qmm_moe_down.h (qmm_sm80's order: csrc/qmm_order.h).
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from zmlx.kernels import downproj_combine, quant
from zmlx.kernels.core import KernelDef, Launch, Skip, device_code
from zmlx.kernels.moe_mlp import quantized_experts
from zmlx.kernels.precision import precision
from zmlx.kernels.quant import or_placeholder, packing, regime_reason, weights_reason
from zmlx.kernels.swiglu_mlp import quantized_linear


def reference(
    h,
    inds,
    scores,
    down_w,
    down_s,
    down_b,
    resid,
    hs=None,
    sdown_w=None,
    sdown_s=None,
    sdown_b=None,
    ebias=None,
    *,
    group_size=None,
    bits=None,
    shared_group_size=None,
    shared_bits=None,
    mode="affine",
    shared_mode="affine",
    f32=False,
):
    """mlx-lm's op sequence, -> (..., D) in T.
    routed: h (..., k, I) in T, inds (..., k), scores (..., k) float32 or T, hs (..., Is) or None;
    dense (inds and scores None): h (..., I), down_w one matrix (D, I).
    ebias (E, D) or None: the routed experts' biases (gpt-oss's down projection), each added
    to its expert's row in T before the weighting, as mlx-lm's SwitchLinear adds it.
    f32: the same in float32 throughout (reference_f32)."""
    p = precision(f32)
    if inds is None:
        return p.cast(resid) + p.dense(h, down_w, down_s, down_b, group_size, bits, mode)
    shared = None
    if hs is not None:
        shared = p.dense(hs, sdown_w, sdown_s, sdown_b, shared_group_size, shared_bits, shared_mode)
    combine = downproj_combine.reference_f32 if f32 else downproj_combine.reference
    y = combine(
        h,
        inds,
        scores,
        down_w,
        down_s,
        down_b,
        shared,
        group_size=group_size,
        bits=bits,
        mode=mode,
        bias=ebias,
    )
    return p.cast(resid) + y


def reference_f32(*args, **kwargs):
    """reference's math in float32 throughout: the accuracy bar."""
    return reference(*args, f32=True, **kwargs)


@functools.cache
def _placeholders() -> tuple[mx.array, mx.array]:
    # the dense variant's indices and scores inputs, never read when DENSE
    return mx.zeros((1,), mx.uint32), mx.zeros((1,), mx.float32)


_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def _dense_reason(backend, x, w, s, b, *, rows: int, group_size, bits, mode, what: str) -> str | None:
    """Why a dense down projection of x (..., cols) by w (rows, cols) does not fit, or None."""
    cols = x.shape[-1]
    why = weights_reason(w, s, b, cols=cols, group_size=group_size, bits=bits, dtype=x.dtype, mode=mode)
    if why is not None:
        return f"{what}: {why}"
    if w.ndim != 2 or w.shape[0] != rows:
        return f"{what}: weights {w.shape} for {rows} outputs"
    n = math.prod(x.shape[:-1])
    # a dense matmul leaves its matvec (qmv or gemv) from 2 rows (mxfp4: from 8)
    if (why := regime_reason(backend, n, x.dtype, s, b, w, qmv_rows=2, gemv_rows=2, mode=mode)) is not None:
        return f"{what}: {why}"
    return None


def launch(
    backend,
    h,
    inds,
    scores,
    down_w,
    down_s,
    down_b,
    resid,
    hs=None,
    sdown_w=None,
    sdown_s=None,
    sdown_b=None,
    ebias=None,
    *,
    group_size=None,
    bits=None,
    shared_group_size=None,
    shared_bits=None,
    mode="affine",
    shared_mode="affine",
) -> Launch | Skip:
    if h.dtype not in _DTYPES:
        return Skip(f"h {h.dtype}")
    if ebias is not None and inds is None:
        return Skip("the dense variant takes no expert biases")
    if (inds is None) != (scores is None):
        return Skip("indices and scores: both or neither (the dense variant)")
    is_dense = inds is None
    if is_dense:  # the dense MLP's down projection
        if hs is not None:
            return Skip("the dense variant takes no shared expert")
        lead, k, i = h.shape[:-1], 1, h.shape[-1]
        d = down_w.shape[0]
        why = _dense_reason(
            backend,
            h,
            down_w,
            down_s,
            down_b,
            rows=d,
            group_size=group_size,
            bits=bits,
            mode=mode,
            what="down",
        )
        if why is not None:
            return Skip(why)
        inds, scores = _placeholders()
        sequential, dtypes = True, (mx.float32, mx.float32)  # no expert sum
        fpqmv = qmm = False
    else:
        # QMM_BLOCK on: qmm_sm80's rows take the QMM block whatever quant.QMM_DOWN says (that
        # switch is downproj_combine's own); off: exactly the checks and reasons of before
        qmm_down = True if quant.QMM_BLOCK else None
        routed = downproj_combine.launch(
            backend,
            h,
            inds,
            scores,
            down_w,
            down_s,
            down_b,
            group_size=group_size,
            bits=bits,
            mode=mode,
            qmm_down=qmm_down,
        )
        if isinstance(routed, Skip):
            return routed
        t = dict(routed.template)
        if t["QMM"] and not quant.QMM_BLOCK:
            return Skip(
                f"{t['N'] * t['K']} expert rows: stock's qmm_sm80 (moe_block's kernels follow its qmv only)"
            )
        lead, k, i, d, sequential = h.shape[:-2], t["K"], t["I"], t["D"], t["SEQUENTIAL"]
        fpqmv, qmm = t["FPQMV"], t["QMM"]
        dtypes = t["P"], t["A"]
        if ebias is not None:
            if qmm:
                return Skip("expert biases: the QMM block takes none (qmm_sm80's rows run stock)")
            if ebias.shape != (down_w.shape[0], d) or ebias.dtype != h.dtype:
                return Skip(
                    f"expert biases {ebias.shape} {ebias.dtype}: ({down_w.shape[0]}, {d}) {h.dtype} needed"
                )
        if hs is not None:
            if sdown_w is None:
                return Skip("shared expert output without its down weights")
            if hs.dtype != h.dtype or hs.shape[:-1] != lead:
                return Skip(f"shared expert input {hs.shape} {hs.dtype} for h {h.shape} {h.dtype}")
            why = _dense_reason(
                backend,
                hs,
                sdown_w,
                sdown_s,
                sdown_b,
                rows=d,
                group_size=shared_group_size,
                bits=shared_bits,
                mode=shared_mode,
                what="shared expert",
            )
            if why is not None:
                return Skip(why)
    if resid.shape != lead + (d,) or resid.dtype != h.dtype:
        return Skip(f"residual {resid.shape} {resid.dtype} for outputs {lead + (d,)} {h.dtype}")
    n = math.prod(lead)
    if n == 0 or n * d * 32 >= 2**31:
        return Skip(f"{n} tokens x {d} outputs for one launch")
    gs, nbits = packing(i, group_size, bits)
    has_shared = hs is not None
    # without a shared expert its inputs are the routed ones, packing and all (never read)
    s_w, s_s, s_b, s_x = (sdown_w, sdown_s, sdown_b, hs) if has_shared else (down_w, down_s, down_b, h)
    i_s = s_x.shape[-1]
    sgs, sbits = packing(i_s, shared_group_size, shared_bits) if has_shared else (gs, nbits)
    return Launch(
        inputs=[
            h,
            inds,
            scores,
            down_w,
            or_placeholder(down_s, down_w),
            or_placeholder(down_b, down_w),
            resid,
            s_x,
            s_w,
            or_placeholder(s_s, s_w),
            or_placeholder(s_b, s_w),
            resid if ebias is None else ebias,  # without biases: never read
        ],
        template=[
            ("T", h.dtype),
            ("P", dtypes[0]),
            ("A", dtypes[1]),
            ("N", n),
            ("K", k),
            ("I", i),
            ("D", d),
            ("GS", gs),
            ("BITS", nbits),
            ("IS", i_s),
            ("SGS", sgs),
            ("SBITS", sbits),
            ("HAS_SHARED", has_shared),
            ("EBIAS", ebias is not None),
            ("DENSE", is_dense),
            ("SEQUENTIAL", sequential),
            ("FPQMV", fpqmv),
            ("QMM", qmm),
            ("PIPE", qmm and quant.QMM_PIPELINED),
        ],
        # QMM: a block of k warps (one an expert) for each 8 outputs; else a warp an output
        grid=(n * (d // 8) * 32 * k if qmm else n * d * 32, 1, 1),
        threadgroup=(32 * k if qmm else 256, 1, 1),
        output_shapes=[lead + (d,)],
        output_dtypes=[h.dtype],
    )


def example():
    h = mx.random.normal((1, 1, 4, 128), key=mx.random.key(81)).astype(mx.bfloat16)
    inds = mx.array([[[3, 0, 5, 1]]], dtype=mx.uint32)
    scores = mx.random.uniform(shape=(1, 1, 4), key=mx.random.key(82))
    w = quantized_experts(6, 13, 128, group_size=64, bits=4, dtype=mx.bfloat16, seed=83)
    resid = mx.random.normal((1, 1, 13), key=mx.random.key(84)).astype(mx.bfloat16)
    hs = mx.random.normal((1, 1, 192), key=mx.random.key(85)).astype(mx.bfloat16)
    sw = quantized_linear(13, 192, group_size=32, bits=8, dtype=mx.bfloat16, seed=86)
    kw = dict(group_size=64, bits=4, shared_group_size=32, shared_bits=8)
    return (h, inds, scores, *w, resid, hs, *sw), kw


def qmm_example(backend: str = "cuda"):
    """A call of the QMM variant: one token's 8 expert rows of 128 outputs, a shared expert (one
    token: qmv); None where no call takes it (off CUDA, or quant.QMM_ORDER or QMM_BLOCK off):
    the self-check's variant_example."""
    if backend != "cuda" or not (quant.QMM_ORDER and quant.QMM_BLOCK):
        return None
    h = mx.random.normal((1, 1, 8, 256), key=mx.random.key(87)).astype(mx.bfloat16)
    inds = mx.array([[[3, 0, 5, 1, 9, 2, 11, 7]]], dtype=mx.uint32)
    scores = mx.random.uniform(shape=(1, 1, 8), key=mx.random.key(88))
    w = quantized_experts(12, 128, 256, group_size=64, bits=4, dtype=mx.bfloat16, seed=89)
    resid = mx.random.normal((1, 1, 128), key=mx.random.key(90)).astype(mx.bfloat16)
    hs = mx.random.normal((1, 1, 192), key=mx.random.key(91)).astype(mx.bfloat16)
    sw = quantized_linear(128, 192, group_size=32, bits=8, dtype=mx.bfloat16, seed=92)
    kw = dict(group_size=64, bits=4, shared_group_size=32, shared_bits=8)
    return (h, inds, scores, *w, resid, hs, *sw), kw


moe_down = KernelDef(
    name="moe_down",
    reference=reference,
    fidelity="close",
    exact_on=("cuda",),  # bitwise stock's qmv/gemv, combine and adds where launch() takes the call
    tolerance=2**-3,  # the self-check only: a few bf16 roundings, far below a layout error
    body=device_code("moe_down_body.h"),
    header=device_code("quant.h", "expert_sum.h", "qmm_order.h", "qmm_moe_down.h"),
    input_names=(
        "h",
        "inds",
        "scores",
        "down_w",
        "down_s",
        "down_b",
        "resid",
        "hs",
        "sdown_w",
        "sdown_s",
        "sdown_b",
        "ebias",
    ),
    output_names=("out",),
    launch=launch,
    example=example,
    variant_example=qmm_example,
)
