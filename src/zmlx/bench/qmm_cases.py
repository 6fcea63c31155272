"""The kernels in qmm_sm80's order (quant.QMM_ORDER) in the per-kernel micro-benchmark
(zmlx.bench.kernels), each against the stock op sequence it replaces, with the switch on for
the fused side's calls (it is off until their cuda tests pass; the benchmark times them
either way): moe_mlp and downproj_combine at Qwen3-30B-A3B's expert shapes (one token, top-8
of 128: 32 stored, a call reads its 8 either way; hidden 2048, expert width 768, affine
4-bit, group 64, bf16), and mla_q_prep_embed at GLM-4.7-Flash's attention shapes (its
reference: mla_q_prep_nope's ops, embed_q's quantized_matmul and SDPA's scale multiply).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import mlx.core as mx

from zmlx.bench.kernels import Case
from zmlx.kernels import mla_q_prep as q_prep
from zmlx.kernels import quant
from zmlx.kernels.downproj_combine import downproj_combine
from zmlx.kernels.downproj_combine import reference as down_stock
from zmlx.kernels.mla_q_prep_embed import mla_q_prep_embed
from zmlx.kernels.mla_q_prep_embed import reference as embed_stock
from zmlx.kernels.moe_mlp import moe_mlp, quantized_experts
from zmlx.kernels.moe_mlp import reference as mlp_stock

D, INTER, E, K = 2048, 768, 32, 8  # Qwen3-30B-A3B's experts (128 there)
Q4: dict[str, Any] = dict(group_size=64, bits=4)


@contextlib.contextmanager
def _qmm_order():
    """quant.QMM_ORDER, QMM_DOWN and QMM_PIPELINED on for the calls inside (the launch reads
    them at each call)."""
    before = quant.QMM_ORDER, quant.QMM_DOWN, quant.QMM_PIPELINED
    quant.QMM_ORDER = quant.QMM_DOWN = quant.QMM_PIPELINED = True
    try:
        yield
    finally:
        quant.QMM_ORDER, quant.QMM_DOWN, quant.QMM_PIPELINED = before


def _switched(fn: Callable[..., Any], *args, **kwargs) -> Callable[[], Any]:
    def call():
        with _qmm_order():
            return fn(*args, **kwargs)

    return call


def qmm_cases(position: int = 4095) -> list[Case]:
    from zmlx.kernels.glm47_rope import rope_table

    ks = mx.random.split(mx.random.key(81), 4)
    x = mx.random.normal((1, 1, D), key=ks[0]).astype(mx.bfloat16)
    inds = mx.random.permutation(E, key=ks[1])[:K].reshape(1, 1, K).astype(mx.uint32)
    h = mx.random.normal((1, 1, K, INTER), key=ks[2]).astype(mx.bfloat16)
    scores = mx.random.uniform(shape=(1, 1, K), key=ks[3]).astype(mx.bfloat16)  # a softmax router's, in T
    gate, up = (quantized_experts(E, INTER, D, dtype=mx.bfloat16, seed=s, **Q4) for s in (82, 83))
    down = quantized_experts(E, D, INTER, dtype=mx.bfloat16, seed=84, **Q4)
    heads, qlr, nope, rope, rank = 20, 768, 192, 64, 512  # GLM-4.7-Flash's attention
    prep = q_prep.inputs(1, heads, qlr, nope, rope, rank, mx.bfloat16, seed=85, packing=Q4, embed_packing=Q4)
    prep_kw = q_prep.kwargs(heads, nope, rope, packing=Q4, embed_packing=Q4, base=1_000_000.0)
    table = rope_table(rope, 1_000_000.0, 1.0, position + 1)
    mx.eval(x, inds, h, scores, gate, up, down, prep, table)
    mlp = (x, inds, *gate, *up)
    down_args = (h, inds, scores, *down)
    embed_args = (*prep, table, position)
    shape = f"1 token, top-{K}, 4-bit"
    return [
        Case(
            "moe_mlp (qmm)",
            f"{shape}, {K} x 2 x {INTER} x {D}",
            lambda: mlp_stock(*mlp, **Q4),
            _switched(moe_mlp, *mlp, **Q4),
        ),
        Case(
            "downproj_combine (qmm)",
            f"{shape}, {K} x {D} x {INTER}, scores in T",
            lambda: down_stock(*down_args, **Q4),
            _switched(downproj_combine, *down_args, **Q4),
        ),
        Case(
            "mla_q_prep_embed",
            f"1 token, 4-bit, {heads} heads, embed {rank} x {nope}, pos {position}",
            lambda: embed_stock(*embed_args, **prep_kw),
            _switched(mla_q_prep_embed, *embed_args, **prep_kw),
        ),
    ]
