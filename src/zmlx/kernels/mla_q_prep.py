"""mla_q_prep: MLA's query and new-key preparation at decode in one launch (launch B of mla_block;
its variant `mla_q_prep_nope`, without embed_q, is mla_prologue's second launch).

Stock, per attention layer and decoded token (mlx-lm `Glm4MoeLiteAttention`, from the
outputs q_a of q_a_proj and ckv of kv_a_proj_with_mqa):

    q = q_b_proj(q_a_layernorm(q_a))              # rms_norm, (Quantized)Linear, T
    q_nope, q_pe = split(q.reshape(B, 1, H, nope + rope).transpose(0, 2, 1, 3))
    kv_latent = kv_a_layernorm(ckv[..., :rank]); k_pe = ckv[..., rank:]
    q_pe = rope(q_pe, offset); k_pe = rope(k_pe, offset)
    q_pe * scale; embed_q(q_nope)                 # pe_scores' multiply; the absorbed query

The DeepSeek-V3 family's (`DeepseekV3Attention`) is the same sequence; its rope may be YaRN
(mlx-lm's `YarnRoPE`), taken as glm47_rope takes it: the table made from its frequencies
(`rope_table(..., freqs=)`), its `mscale` multiplying q_pe and k_pe in T before the rotation
(csrc/glm47_rope.h's ZMLX_ROPE_IN), and `scale` the module's, which holds YaRN's
mscale_all_dim factor.

Fused: EMBED_SLICES threadgroups per (b, head), each recomputing q_a_layernorm in MLX's
rms_norm order (residual_norm's geometry, norm_router's scheme) into threadgroup memory and
the head's q_nope rows of q_b_proj (warps RQ rows at once) rounded to T; the first also the
rope rows, roped with glm47_rope's arithmetic (its table row, a view: no per-token host
array) and scaled in T; each then its share of embed_q's kv_lora_rank rows from q_nope.
B more threadgroups do kv_a_layernorm of ckv[..., :rank] and the rope of k_pe.

Outputs, what mla_attention's kernels and mlx-lm's cache take: qv (B, H, rank) float32
(mla_decode's absorbed query, as mla_embed_q gives it), q_pe * scale (B, H, 1, rope) T,
kv_latent (B, 1, 1, rank) T and k_pe (B, 1, 1, rope) T (for `cache.update_and_fetch`).

Fidelity: on CUDA the norms, q_b_proj (MLX's qmv order, or gemv unquantized, at one token;
more tokens take the reference) and both ropes are bitwise stock, so q_pe, kv_latent and
k_pe are exact. embed_q is not: from 8 heads stock's `quantized_matmul` of (B, H, 1, nope) by
the (H, rank, nope) stack runs `qmm_sm80` (MLX's CUDA `QuantizedMatmul::eval_gpu` takes qmv
only for M * batch < 8: a tensor-core GEMM, bf16 mma.sync in k-steps of 16, rounded to T),
while mla_decode takes a float32 qv; so qv is computed as mla_embed_q does it (float32,
mla.h's `zmlx_mla_rows`), one rounding less than stock, and the reference gives stock's
embed_q values widened to float32: `close` (exact_on empty). On Metal every dot is a
float32 sum (close).

`mla_q_prep_nope` (the same body with ZMLX_QV 0; its own KernelDef, for its inputs and
outputs differ): no embed_q, its first output q_nope (B, H, 1, nope) in T, q_b_proj's nope
rows as stock's matmul rounds them; a head's rows spread over threadgroups (slices of 2 rows
a warp, each recomputing the norm). Every output is stock's (bitwise on CUDA; close on
Metal), so mla_prologue hands q_nope to mlx-lm's own embed_q; its reference is mlx-lm's ops.

Device code: csrc/mla_q_prep_body.h; csrc/quant.h (qmv-order dots), csrc/residual_norm.h
(the norm), csrc/glm47_rope.h (the rotation), csrc/mla.h (the float32 row dots).
"""

from __future__ import annotations

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code, float_bits
from zmlx.kernels.glm47_rope import rope_table, scale_bits, stock_rope
from zmlx.kernels.mla_q_prep_inputs import inputs, kwargs
from zmlx.kernels.quant import or_placeholder, packing, qmm_embed_reason, regime_reason, weights_reason
from zmlx.kernels.residual_norm import geometry
from zmlx.kernels.swiglu_mlp import dense

_DTYPES = (mx.bfloat16, mx.float16, mx.float32)
THREADS = 512  # per threadgroup (at least the norms' BLOCK): 16 warps split a head's rows
RW = 4  # the float32 row dots (embed_q; q_b_proj on Metal): rows per warp at once
RQ = 4  # q_b_proj's qmv-order dots on CUDA: rows per warp at once (their loads in flight together)
EMBED_SLICES = 4  # with embed_q: threadgroups per head, each R / ES embed rows (at most)
_SHARED_BYTES = 32768  # Metal's threadgroup memory


def reference(
    q_a,
    ckv,
    qa_norm_w,
    qb_w,
    qb_s,
    qb_b,
    kv_norm_w,
    eq_w,
    eq_s,
    eq_b,
    table,
    offset,
    *,
    embed_group_size=None,
    embed_bits=None,
    **kw,
):
    """q_a (B, 1, q_lora_rank) and ckv (B, 1, rank + rope_dims): q_a_proj's and
    kv_a_proj_with_mqa's outputs at decode (T); qa_norm_w, kv_norm_w the two RMSNorm weights;
    qb_* q_b_proj's (heads * (nope + rope_dims), q_lora_rank) weights and embed_q's per-head
    (heads, rank, nope) weights (affine-quantized with scales and biases, or unquantized with
    s and b None; (group_size, bits) and (embed_group_size, embed_bits) their packings);
    table, offset: glm47_rope's cos/sin table (`rope_table`; the reference does not need it)
    and the cache position (int). With qa_norm_w None, q_a is already q (q_lora_rank None:
    q_proj's output) and qb_* are not read. kw: reference_nope's.

    -> (qv (B, heads, rank) float32, q_pe * scale (B, heads, 1, rope_dims) T,
    kv_latent (B, 1, 1, rank) T, k_pe (B, 1, 1, rope_dims) T): reference_nope's, then
    MultiLinear's matmul, qv being stock's embed_q output widened."""
    q_nope, q_pe, kv_latent, k_pe = reference_nope(
        q_a, ckv, qa_norm_w, qb_w, qb_s, qb_b, kv_norm_w, table, offset, **kw
    )
    if eq_s is None:  # mlx-lm's MultiLinear
        qv = q_nope @ eq_w.swapaxes(-1, -2)
    else:  # its QuantizedMultiLinear
        qv = mx.quantized_matmul(
            q_nope, eq_w, eq_s, eq_b, transpose=True, group_size=embed_group_size, bits=embed_bits
        )
    return qv.reshape(q_a.shape[0], kw["heads"], -1).astype(mx.float32), q_pe, kv_latent, k_pe


def reference_nope(
    q_a,
    ckv,
    qa_norm_w,
    qb_w,
    qb_s,
    qb_b,
    kv_norm_w,
    table,
    offset,
    *,
    eps,
    heads,
    rope_dims,
    base,
    rope_scale,
    scale,
    group_size=None,
    bits=None,
    freqs=None,
    mscale=1.0,
):
    """mla_q_prep_nope's: `reference`'s arguments without embed_q's -> (q_nope (B, heads, 1,
    nope) T, q_pe * scale, kv_latent, k_pe): mlx-lm's op sequence (rms_norm, the
    (Quantized)Linear op, reshape/transpose/split, nn.RoPE's mx.fast.rope, the scale
    multiply). eps: both norms' (mlx-lm gives them one). YaRN: base None, `freqs` and
    `mscale` as mlx-lm's YarnRoPE holds them (`_freqs`, `mscale`), as glm47_rope takes them."""
    b, n, _ = q_a.shape
    if qa_norm_w is None:
        q = q_a
    else:
        q = dense(mx.fast.rms_norm(q_a, qa_norm_w, eps), qb_w, qb_s, qb_b, group_size, bits)
    q = q.reshape(b, n, heads, -1).transpose(0, 2, 1, 3)
    q_nope, q_pe = mx.split(q, [q.shape[-1] - rope_dims], axis=-1)
    rank = ckv.shape[-1] - rope_dims
    kv, k_pe = mx.split(ckv, [rank], axis=-1)
    k_pe = k_pe.reshape(b, n, 1, rope_dims).transpose(0, 2, 1, 3)
    kv_latent = mx.fast.rms_norm(kv, kv_norm_w, eps)
    rope = dict(base=base, rope_scale=rope_scale, freqs=freqs, mscale=mscale)
    q_pe, k_pe = stock_rope(q_pe, k_pe, offset, rope_dims, **rope)
    kv_latent = mx.expand_dims(kv_latent, axis=1)
    return q_nope, q_pe * scale, kv_latent, k_pe


def _shape_reason(q_a, ckv, qa_norm_w, kv_norm_w, heads, rope_dims) -> str | None:
    if q_a.dtype not in _DTYPES or ckv.dtype != q_a.dtype:
        return f"q_a {q_a.dtype}, ckv {ckv.dtype} (one float dtype needed)"
    if qa_norm_w.dtype != q_a.dtype or kv_norm_w.dtype != q_a.dtype:
        return f"norm weights {qa_norm_w.dtype}, {kv_norm_w.dtype} not in the activations' dtype {q_a.dtype}"
    if q_a.ndim != 3 or ckv.ndim != 3 or q_a.shape[1] != 1 or ckv.shape[:2] != q_a.shape[:2]:
        return f"q_a {q_a.shape}, ckv {ckv.shape}: one token per sequence (decode) only"
    rank = ckv.shape[-1] - rope_dims
    if rope_dims <= 0 or rope_dims % 2 or rope_dims > 2 * THREADS or rank <= 0:
        return f"rope_dims {rope_dims} for ckv {ckv.shape}"
    if qa_norm_w.shape != q_a.shape[-1:] or kv_norm_w.shape != (rank,):
        return f"norm weights {qa_norm_w.shape}, {kv_norm_w.shape} for rows of {q_a.shape[-1]}, {rank}"
    if heads <= 0 or q_a.shape[0] == 0:
        return f"{heads} heads, {q_a.shape[0]} sequences"
    return None


def variant_launch(
    backend,
    q_a,
    ckv,
    qa_norm_w,
    qb_w,
    qb_s,
    qb_b,
    kv_norm_w,
    embed,
    table,
    offset,
    *,
    exact: bool = False,
    eps,
    heads,
    rope_dims,
    base,
    rope_scale,
    scale,
    group_size=None,
    bits=None,
    freqs=None,
    mscale=1.0,
) -> Launch | Skip:
    """The three variants': embed (eq_w, eq_s, eq_b, embed_group_size, embed_bits), or None;
    exact: embed_q in qmm_sm80's order, times SDPA's scale, out in T (mla_q_prep_embed)."""
    if qa_norm_w is None:
        return Skip("no q_a_layernorm (q_lora_rank None: q_proj) is not fused yet")
    if why := _shape_reason(q_a, ckv, qa_norm_w, kv_norm_w, heads, rope_dims):
        return Skip(why)
    bsz, qlr, dtype = q_a.shape[0], q_a.shape[-1], q_a.dtype
    rank = ckv.shape[-1] - rope_dims
    if qb_w.ndim != 2 or qb_w.shape[0] % heads:
        return Skip(f"q_b_proj weights {qb_w.shape} for {heads} heads")
    qw = qb_w.shape[0] // heads
    nope = qw - rope_dims
    if nope <= 0:
        return Skip(f"q_b_proj's {qw} rows per head leave no nope part beside rope {rope_dims}")
    if why := weights_reason(qb_w, qb_s, qb_b, cols=qlr, group_size=group_size, bits=bits, dtype=dtype):
        return Skip(f"q_b_proj: {why}")
    if why := regime_reason(backend, bsz, dtype, qb_s, qb_b, qb_w, qmv_rows=2, gemv_rows=2):
        return Skip(f"q_b_proj: {why}")
    qgs, qbits = packing(qlr, group_size, bits)
    widths = [("q_lora_rank", qlr, qbits)]
    embed_inputs, embed_template = [], []
    if embed is not None:
        eq_w, eq_s, eq_b, embed_group_size, embed_bits = embed
        if eq_w.ndim != 3 or eq_w.shape[:2] != (heads, rank):
            return Skip(f"embed_q weights {eq_w.shape} for {heads} heads of latent {rank}")
        eq_kw = dict(group_size=embed_group_size, bits=embed_bits)
        if why := weights_reason(eq_w, eq_s, eq_b, cols=nope, dtype=dtype, **eq_kw):
            return Skip(f"embed_q: {why}")
        rows = bsz * heads
        if exact and (
            why := qmm_embed_reason(backend, rows, dtype, eq_s, eq_b, rank, nope, sequences=bsz, **eq_kw)
        ):
            return Skip(f"embed_q: {why}")
        egs, ebits = packing(nope, embed_group_size, embed_bits)
        widths.append(("nope", nope, ebits))
        embed_inputs = [eq_w, or_placeholder(eq_s, q_a), or_placeholder(eq_b, q_a)]
        embed_template = [("EGS", egs), ("EBITS", ebits)]
    for name, cols, nbits in widths:
        if cols % (4 if nbits == 32 else 32 // nbits) or cols > 4096:
            return Skip(f"{name} {cols}: a whole number of packed words (or of 4 values), at most 4096")
    if not isinstance(offset, int) or offset < 0:
        return Skip(f"offset {offset!r}: one int position for the batch needed")
    if (
        table.dtype != mx.float32
        or table.ndim != 2
        or table.shape[1] != rope_dims
        or table.shape[0] <= offset
    ):
        return Skip(f"table {table.shape} {table.dtype} does not cover position {offset}")
    geos = []  # the two norms' (BLOCK, CHUNKS, NR)
    for d in (qlr, rank):
        geo = geometry(backend, d, dtype.size)
        if isinstance(geo, Skip):
            return geo
        if geo[1] * geo[2] > 64:
            return Skip(f"row of {d} needs {geo[1] * geo[2]} values per thread")
        geos.append(geo)
    (qblock, qchunks, qnr), (kblock, kchunks, knr) = geos
    threads = max(THREADS, qblock, kblock)
    # rows per threadgroup: the head's (embed_q needs its whole q_nope row), else two rounds of
    # the warps on CUDA, one on Metal (RW rows a warp): even, so no rope pair (even nope) splits
    ql = qw if embed is not None or nope % 2 else min(qw, (threads // 32) * (RW if backend == "metal" else 2))
    if qlr * 4 + ql * 4 + 128 > _SHARED_BYTES:
        return Skip(f"q_lora_rank {qlr} does not fit in threadgroup memory")
    qs = -(-qw // ql)
    # embed slices: R / ES rows each (whole groups of 8 rows, a warp's, when exact)
    slices = range(EMBED_SLICES if embed is not None else 1, 0, -1)
    es = next((e for e in slices if rank % (8 * e if exact else e) == 0), 1)
    rq = max(1, min(RQ, ql // (threads // 32)))
    q_out = ((bsz, heads, rank), mx.float32) if embed is not None else ((bsz, heads, 1, nope), dtype)
    if exact:
        q_out = ((bsz, heads, 1, rank), dtype)
    return Launch(
        inputs=[
            q_a,
            ckv,
            qa_norm_w,
            qb_w,
            or_placeholder(qb_s, q_a),
            or_placeholder(qb_b, q_a),
            kv_norm_w,
            *embed_inputs,
            table[offset : offset + 1],  # the position's row: a view
        ],
        template=[
            ("T", dtype),
            ("H", heads),
            ("QLR", qlr),
            ("QW", qw),
            ("NOPE", nope),
            ("RD", rope_dims),
            ("R", rank),
            ("KVW", ckv.shape[-1]),
            ("QS", qs),
            ("QL", ql),
            ("ES", es),
            ("NB", bsz * heads * qs * es),
            ("TG", threads),
            ("RW", RW),
            ("RQ", rq),
            ("QBLOCK", qblock),
            ("QCHUNKS", qchunks),
            ("QNR", qnr),
            ("KBLOCK", kblock),
            ("KCHUNKS", kchunks),
            ("KNR", knr),
            ("QGS", qgs),
            ("QBITS", qbits),
            *embed_template,
            ("EPS_BITS", float_bits(eps)),
            ("SCALE_BITS", scale_bits(scale, dtype)),  # float(T(scale)), as stock's multiply
            ("MSCALE_BITS", scale_bits(mscale, dtype)),  # YaRN's frequencies are the table's
        ],
        grid=((bsz * heads * qs * es + bsz) * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[q_out[0], (bsz, heads, 1, rope_dims), (bsz, 1, 1, rank), (bsz, 1, 1, rope_dims)],
        output_dtypes=[q_out[1], dtype, dtype, dtype],
    )


def launch(
    backend, q_a, ckv, qa_norm_w, qb_w, qb_s, qb_b, kv_norm_w, eq_w, eq_s, eq_b, table, offset, **kw
) -> Launch | Skip:
    """mla_q_prep's launch: reference's arguments."""
    embed = (eq_w, eq_s, eq_b, kw.pop("embed_group_size", None), kw.pop("embed_bits", None))
    return variant_launch(
        backend, q_a, ckv, qa_norm_w, qb_w, qb_s, qb_b, kv_norm_w, embed, table, offset, **kw
    )


def launch_nope(
    backend, q_a, ckv, qa_norm_w, qb_w, qb_s, qb_b, kv_norm_w, table, offset, **kw
) -> Launch | Skip:
    """mla_q_prep_nope's launch: reference_nope's arguments."""
    return variant_launch(
        backend, q_a, ckv, qa_norm_w, qb_w, qb_s, qb_b, kv_norm_w, None, table, offset, **kw
    )


def example():
    # 3 heads, q_lora_rank 96, nope 64 (not 32: no stock CUDA kernel there), rope 16, latent 128
    p = dict(group_size=32, bits=4)
    args = inputs(1, 3, 96, 64, 16, 128, mx.bfloat16, 71, packing=p, embed_packing=p)
    kw = kwargs(3, 64, 16, packing=p, embed_packing=p)
    return (*args, rope_table(16, kw["base"], 1.0, 300), 257), kw


def nope_example():
    """example() without embed_q's weights and packing."""
    args, kw = example()
    return (*args[:7], *args[10:]), {k: v for k, v in kw.items() if not k.startswith("embed_")}


_HEADER = device_code("quant.h", "residual_norm.h", "glm47_rope.h", "mla.h")

mla_q_prep = KernelDef(
    name="mla_q_prep",
    reference=reference,
    fidelity="close",  # qv is float32 where stock rounds embed_q to T; the rest is exact on CUDA
    tolerance=2**-3,  # the self-check only: a few roundings of T, far below a layout error
    body=device_code("mla_q_prep_body.h"),
    header="#define ZMLX_QV 1\n" + _HEADER,
    input_names=("q_a", "ckv", "qa_w", "qb_w", "qb_s", "qb_b", "kv_w", "eq_w", "eq_s", "eq_b", "cs"),
    output_names=("qv", "q_pe", "kv_latent", "k_pe"),
    launch=launch,
    example=example,
)

# The same body without embed_q (mla_prologue's launch, which leaves embed_q to mlx-lm): every
# output stock's, so exact where the dots follow stock's order (CUDA) and on the CPU.
mla_q_prep_nope = KernelDef(
    name="mla_q_prep_nope",
    reference=reference_nope,
    fidelity="close",
    exact_on=("cuda",),  # bitwise stock's rms_norm + qmv/gemv + rope where launch() takes the call
    tolerance=2**-3,  # the self-check only: a few roundings of T, far below a layout error
    body=mla_q_prep.body,
    header="#define ZMLX_QV 0\n" + _HEADER,
    input_names=("q_a", "ckv", "qa_w", "qb_w", "qb_s", "qb_b", "kv_w", "cs"),
    output_names=("q_nope", "q_pe", "kv_latent", "k_pe"),
    launch=launch_nope,
    example=nope_example,
)
