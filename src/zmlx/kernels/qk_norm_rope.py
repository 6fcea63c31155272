"""qk_norm_rope: the per-head RMSNorms of the queries and keys and their RoPE, in one launch
(decode; the second launch of gqa_prologue).

Stock, per attention layer and decoded token (mlx-lm `qwen3_moe`'s `Attention`, after its
q, k and v projections):

    q = q_norm(q.reshape(B, 1, H, D)).transpose(0, 2, 1, 3)     # mx.fast.rms_norm per head
    k = k_norm(k.reshape(B, 1, HK, D)).transpose(0, 2, 1, 3)
    q, k = rope(q, offset), rope(k, offset)                     # nn.RoPE(D, traditional=False)

four launches. Here one reads q and the keys at the start of the fused k|v projection's row
(gqa_prologue's first launch writes [k | v]) and writes the rotated q (B, H, 1, D) and k
(B, HK, 1, D), bitwise what those four give on CUDA:
- each head's norm in MLX's rms_norm order (residual_norm's geometry and reduction), the
  output rounded to T as stock writes it;
- the rotation of pair (i, i + D/2) by the position's (cos, sin) from glm47_rope's table,
  made by `mx.fast.rope` itself: the frequencies and angle of pair i do not depend on the
  pairing (MLX's kernels compute theta from i alone, traditional or not), so the traditional
  table holds this rope's values too; the rotation rounded as MLX's kernel is compiled
  (csrc/glm47_rope.h's ZMLX_ROPE_X1/X2), then to T.
Variants, each a template switch, each stock's op where the attention has it:
- BIAS (GLM-4.5, gpt-oss: the projections' `x + bias`): the value plus its bias, one rounding
  of a float32 sum, before the norm (MLX's add of two values of T gives the same: their exact
  sum is a float32, or its smaller term lies below half an ulp of T);
- NORM off (GLM-4.5-Air, gpt-oss: no q/k norms): the projections' values roped as they are;
- RD < D (GLM-4.5's partial_rotary_factor): the first RD values rotated, the rest copied;
- YaRN (gpt-oss's YarnRoPE): the table made with its frequencies, the rotated values first
  scaled in T by its mscale (glm47_rope's rules, csrc/glm47_rope.h's ZMLX_ROPE_IN).
The position reaches the kernel as the table's row (a view): no recompile per token.
On Metal the same body (close: MLX's Metal rope and norm are not followed there).

Device code: csrc/qk_norm_rope_body.h; csrc/residual_norm.h (the reduction) and
csrc/glm47_rope.h (the rotation) as its header.
"""

from __future__ import annotations

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code, float_bits
from zmlx.kernels.glm47_rope import rope_table, scale_bits
from zmlx.kernels.residual_norm import geometry

_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def reference(
    q,
    kv,
    q_norm_w,
    k_norm_w,
    table,
    offset,
    q_bias=None,
    k_bias=None,
    *,
    heads,
    kv_heads,
    eps_q,
    eps_k,
    base,
    rope_scale,
    rope_dims=None,
    freqs=None,
    mscale=1.0,
):
    """mlx-lm's ops. q (B, 1, heads * D), kv (B, 1, >= kv_heads * D) whose first kv_heads * D
    values are the keys, the norms' weights (D,) or None (no q/k norm, e.g. GLM-4.5-Air), the
    projections' biases (heads * D,), (kv_heads * D,) or None; offset: the cache position (an
    int, or an int32 scalar array); rope_dims: the rope's dims (None: D). -> (q (B, heads, 1,
    D), k (B, kv_heads, 1, D)). YaRN (mlx-lm's YarnRoPE, gpt-oss's): base None, `freqs` and
    `mscale` as the module holds them (`_freqs`, `mscale`). `table` is the kernel's
    (rope_table of rope_dims, with those frequencies); the reference does not need it."""
    b, n, _ = q.shape
    d = q.shape[-1] // heads
    k = kv[..., : kv_heads * d]
    if q_bias is not None:  # the projection's `x + bias`
        q, k = q + q_bias, k + k_bias
    q, k = q.reshape(b, n, heads, d), k.reshape(b, n, kv_heads, d)
    if q_norm_w is not None:
        q, k = mx.fast.rms_norm(q, q_norm_w, eps_q), mx.fast.rms_norm(k, k_norm_w, eps_k)
    q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
    dims = d if rope_dims is None else rope_dims
    if mscale != 1.0:  # YarnRoPE scales its input in the input's dtype, before the rope
        q, k = q.at[..., :dims].multiply(mscale), k.at[..., :dims].multiply(mscale)
    rope = dict(traditional=False, base=base, scale=rope_scale, offset=offset, freqs=freqs)
    return mx.fast.rope(q, dims, **rope), mx.fast.rope(k, dims, **rope)


def launch(
    backend,
    q,
    kv,
    q_norm_w,
    k_norm_w,
    table,
    offset,
    q_bias=None,
    k_bias=None,
    *,
    heads,
    kv_heads,
    eps_q,
    eps_k,
    base,
    rope_scale,
    rope_dims=None,
    freqs=None,
    mscale=1.0,
) -> Launch | Skip:
    dtypes = {a.dtype for a in (q_norm_w, k_norm_w, q_bias, k_bias) if a is not None}
    if q.dtype not in _DTYPES or kv.dtype != q.dtype or not dtypes <= {q.dtype}:
        others = ", ".join(sorted(map(str, dtypes)))
        return Skip(f"q {q.dtype}, kv {kv.dtype}, norm weights and biases {others} (one float dtype needed)")
    if (q_norm_w is None) != (k_norm_w is None) or (q_bias is None) != (k_bias is None):
        return Skip("both norms or neither, both biases or neither")
    if q.ndim != 3 or kv.ndim != 3 or q.shape[1] != 1 or kv.shape[:2] != q.shape[:2]:
        return Skip(f"q {q.shape}, kv {kv.shape}: one token per sequence (decode) only")
    d = q.shape[-1] // heads if heads > 0 else 0
    rd = d if rope_dims is None else rope_dims
    if (
        d == 0
        or q.shape[-1] != heads * d
        or kv_heads < 1
        or kv.shape[-1] < kv_heads * d
        or rd % 2
        or not 0 < rd <= d
    ):
        return Skip(
            f"q {q.shape}, kv {kv.shape} are not {heads} and {kv_heads} heads with a rope of {rd} dims"
        )
    if q_norm_w is not None and (q_norm_w.shape != (d,) or k_norm_w.shape != (d,)):
        return Skip(f"norm weights {q_norm_w.shape}, {k_norm_w.shape}: ({d},) needed")
    if q_bias is not None and (q_bias.shape != (heads * d,) or k_bias.shape != (kv_heads * d,)):
        return Skip(f"biases {q_bias.shape}, {k_bias.shape}: ({heads * d},), ({kv_heads * d},) needed")
    if not isinstance(offset, int) or offset < 0:
        return Skip(f"offset {offset!r}: one int position for the batch needed")
    if table.dtype != mx.float32 or table.ndim != 2 or table.shape[1] != rd or table.shape[0] <= offset:
        return Skip(f"table {table.shape} {table.dtype} does not cover position {offset}")
    geo = geometry(backend, d, q.dtype.size)
    if isinstance(geo, Skip):
        return geo
    block, chunks, nr = geo
    if chunks * nr > 64:
        return Skip(f"head of {d} needs {chunks * nr} values per thread")
    threads = max(block, 32 * -(-(d // 2) // 32))
    if threads > 1024:
        return Skip(f"head of {d} needs {threads} threads")
    b = q.shape[0]
    groups = b * (heads + kv_heads)
    norm, bias = q_norm_w is not None, q_bias is not None
    return Launch(
        # absent norm weights or biases: the table in their slots (the body does not read them)
        inputs=[
            q,
            kv,
            q_norm_w if norm else table,
            k_norm_w if norm else table,
            q_bias if bias else table,
            k_bias if bias else table,
            table[offset : offset + 1],  # the position's row: a view
        ],
        template=[
            ("T", q.dtype),
            ("H", heads),
            ("HK", kv_heads),
            ("D", d),
            ("RD", rd),
            ("KVW", kv.shape[-1]),
            ("BLOCK", block),
            ("CHUNKS", chunks),
            ("NR", nr),
            ("TG", threads),
            ("NORM", int(norm)),
            ("BIAS", int(bias)),
            ("EPS_Q_BITS", float_bits(eps_q) if norm else 0),
            ("EPS_K_BITS", float_bits(eps_k) if norm else 0),
            ("MSCALE_BITS", scale_bits(mscale, q.dtype)),  # the frequencies are the table's
        ],
        grid=(groups * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(b, heads, 1, d), (b, kv_heads, 1, d)],
        output_dtypes=[q.dtype, q.dtype],
    )


def inputs(
    b,
    heads,
    kv_heads,
    d,
    dtype,
    seed,
    *,
    offset=257,
    base=1_000_000.0,
    eps=1e-6,
    norm=True,
    bias=False,
    rope_dims=None,
):
    """Random (q, kv, q_norm_w, k_norm_w, table, offset[, q_bias, k_bias]) and kwargs: kv holds
    keys then values; `norm` False: no norm weights; `bias`: the projections' biases."""
    keys = mx.random.split(mx.random.key(seed), 6)
    q = mx.random.normal((b, 1, heads * d), key=keys[0]).astype(dtype)
    kv = mx.random.normal((b, 1, 2 * kv_heads * d), key=keys[1]).astype(dtype)
    qn = (1 + 0.1 * mx.random.normal((d,), key=keys[2])).astype(dtype) if norm else None
    kn = (1 + 0.1 * mx.random.normal((d,), key=keys[3])).astype(dtype) if norm else None
    rd = d if rope_dims is None else rope_dims
    kw = dict(heads=heads, kv_heads=kv_heads, eps_q=eps, eps_k=eps, base=base, rope_scale=1.0)
    if rope_dims is not None:
        kw["rope_dims"] = rope_dims
    args = (q, kv, qn, kn, rope_table(rd, base, 1.0, offset + 1), offset)
    if bias:
        qb = (0.5 * mx.random.normal((heads * d,), key=keys[4])).astype(dtype)
        kb = (0.5 * mx.random.normal((kv_heads * d,), key=keys[5])).astype(dtype)
        args += (qb, kb)
    return args, kw


def example():
    # Qwen3-MoE's head width (128, base 1e6) with fewer heads: 5 query heads over 3 key heads
    return inputs(1, 5, 3, 128, mx.bfloat16, 61)


qk_norm_rope = KernelDef(
    name="qk_norm_rope",
    reference=reference,
    fidelity="close",
    exact_on=("cuda",),  # bitwise stock's rms_norm and rope where launch() takes the call
    tolerance=2**-3,  # the self-check only: a few roundings of T, far below a layout error
    body=device_code("qk_norm_rope_body.h"),
    header=device_code("residual_norm.h", "glm47_rope.h"),
    input_names=("q", "kv", "q_norm_w", "k_norm_w", "q_bias", "k_bias", "cs"),
    output_names=("q_out", "k_out"),
    launch=launch,
    example=example,
)
