"""mla_q_prep_embed: mla_q_prep_nope's launch with embed_q and SDPA's query scale in it, every
value stock's (mla_prologue's second launch where quant.QMM_ORDER allows; CUDA).

Stock, after what mla_q_prep_nope computes (q_nope in T, q_pe * scale, kv_latent, k_pe):

    q = embed_q(q_nope)                  # MultiLinear: quantized_matmul over the heads, T
    scaled_dot_product_attention(q, ..., scale=scale)
        -> q * T(scale), in T            # the first op of MLX's fallback (at decode on
                                         #   CUDA: the rope scores are an array mask)

On CUDA MultiLinear's product of (B, H, 1, nope) by the (H, rank, nope) stack runs qmm_sm80
from 8 heads (B x H >= 8; rank a multiple of 128, nope of max(64, group)), whose order per
output element csrc/qmm_order.h follows (bitwise in benchmarks/gpu/qmm_order_probe.py's
embed_q case on the H200). So the launch's first output is q_s (B, H, 1, rank) in T, stock's
`q * T(scale)`: two stock launches fewer a layer (the matmul and SDPA's multiply), and
mla_prologue runs the rest of SDPA's fallback (matmul, add of the rope scores, softmax,
matmul) itself.

Fidelity: exact on CUDA in stock's qmm_sm80 regime (else the launch skips and mla_prologue
keeps mla_q_prep_nope); on the CPU the reference (stock's ops) runs; on Metal embed_q is
mla_q_prep's float32 row sums, rounded to T and scaled (close; mla_prologue does not take
it there: Metal's attention is not known to run the fallback). Off with quant.QMM_ORDER
(until its cuda tests ran on a GPU).

Device code: csrc/mla_q_prep_body.h with ZMLX_QV 2, csrc/qmm_order.h (the order); the rest as
mla_q_prep's: csrc/quant.h, csrc/residual_norm.h, csrc/glm47_rope.h, csrc/mla.h.
"""

from __future__ import annotations

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code
from zmlx.kernels.glm47_rope import rope_table
from zmlx.kernels.mla_q_prep import mla_q_prep, reference_nope, variant_launch
from zmlx.kernels.mla_q_prep_inputs import inputs, kwargs


def reference(q_a, ckv, qa_norm_w, qb_w, qb_s, qb_b, kv_norm_w, eq_w, eq_s, eq_b, table, offset, **kw):
    """mla_q_prep's arguments -> (q_s (B, heads, 1, rank) T, q_pe * scale, kv_latent, k_pe):
    reference_nope's, then MultiLinear's matmul (QuantizedMultiLinear's quantized_matmul, or
    the unquantized product) and SDPA's multiply by T(scale) in T."""
    embed_group_size, embed_bits = kw.pop("embed_group_size", None), kw.pop("embed_bits", None)
    q_nope, q_pe, kv_latent, k_pe = reference_nope(
        q_a, ckv, qa_norm_w, qb_w, qb_s, qb_b, kv_norm_w, table, offset, **kw
    )
    if eq_s is None:
        q = q_nope @ eq_w.swapaxes(-1, -2)
    else:
        q = mx.quantized_matmul(
            q_nope, eq_w, eq_s, eq_b, transpose=True, group_size=embed_group_size, bits=embed_bits
        )
    return mx.multiply(mx.array(kw["scale"], q.dtype), q), q_pe, kv_latent, k_pe


def launch(
    backend, q_a, ckv, qa_norm_w, qb_w, qb_s, qb_b, kv_norm_w, eq_w, eq_s, eq_b, table, offset, **kw
) -> Launch | Skip:
    """mla_q_prep's launch with the exact embed (its checks: quant.qmm_embed_reason)."""
    embed = (eq_w, eq_s, eq_b, kw.pop("embed_group_size", None), kw.pop("embed_bits", None))
    return variant_launch(
        backend, q_a, ckv, qa_norm_w, qb_w, qb_s, qb_b, kv_norm_w, embed, table, offset, exact=True, **kw
    )


def example():
    """8 heads (stock's embed_q on qmm_sm80 from 8 rows), q_lora_rank 96, nope 64, rope 16,
    latent 128: the smallest shape the CUDA kernel takes."""
    p = dict(group_size=32, bits=4)
    args = inputs(1, 8, 96, 64, 16, 128, mx.bfloat16, 73, packing=p, embed_packing=p)
    kw = kwargs(8, 64, 16, packing=p, embed_packing=p)
    return (*args, rope_table(16, kw["base"], 1.0, 300), 257), kw


mla_q_prep_embed = KernelDef(
    name="mla_q_prep_embed",
    reference=reference,
    fidelity="close",
    exact_on=("cuda",),  # bitwise stock's ops where launch() takes the call
    tolerance=2**-3,  # the self-check only: a few roundings of T, far below a layout error
    body=mla_q_prep.body,
    header="#define ZMLX_QV 2\n"
    + device_code("quant.h", "residual_norm.h", "glm47_rope.h", "mla.h", "qmm_order.h"),
    input_names=mla_q_prep.input_names,
    output_names=("q_s", "q_pe", "kv_latent", "k_pe"),
    launch=launch,
    example=example,
)
