"""Random inputs at a layer's scales for mla_q_prep and mla_q_prep_nope (their self-checks,
tests and benchmarks): `inputs` and the keyword arguments that go with them, `kwargs`."""

from __future__ import annotations

import mlx.core as mx


def inputs(b, heads, qlr, nope, rope_dims, rank, dtype, seed, *, packing=None, embed_packing=None):
    """Random (q_a, ckv, qa_norm_w, qb_w, qb_s, qb_b, kv_norm_w, eq_w, eq_s, eq_b) at a layer's
    scales; packing / embed_packing: {group_size, bits} of q_b_proj / embed_q (None:
    unquantized, in dtype)."""
    from zmlx.kernels.moe_mlp import quantized_experts
    from zmlx.kernels.swiglu_mlp import quantized_linear

    ks = mx.random.split(mx.random.key(seed), 4)
    q_a = (2 * mx.random.normal((b, 1, qlr), key=ks[0])).astype(dtype)
    ckv = (2 * mx.random.normal((b, 1, rank + rope_dims), key=ks[1])).astype(dtype)
    qa_norm_w = (1 + 0.1 * mx.random.normal((qlr,), key=ks[2])).astype(dtype)
    kv_norm_w = (1 + 0.1 * mx.random.normal((rank,), key=ks[3])).astype(dtype)
    qp = packing or dict(group_size=None, bits=None)
    ep = embed_packing or dict(group_size=None, bits=None)
    qb = quantized_linear(heads * (nope + rope_dims), qlr, dtype=dtype, seed=seed + 1, **qp)
    eq = quantized_experts(heads, rank, nope, dtype=dtype, seed=seed + 2, **ep)
    return (q_a, ckv, qa_norm_w, *qb, kv_norm_w, *eq)


def kwargs(heads, nope, rope_dims, *, packing=None, embed_packing=None, base=10_000.0):
    """The keyword arguments that go with `inputs`: mlx-lm's scale (nope + rope_dims) ** -0.5."""
    qp = packing or dict(group_size=None, bits=None)
    ep = embed_packing or dict(group_size=None, bits=None)
    return dict(
        eps=1e-5,
        heads=heads,
        rope_dims=rope_dims,
        base=base,
        rope_scale=1.0,
        scale=(nope + rope_dims) ** -0.5,
        group_size=qp["group_size"],
        bits=qp["bits"],
        embed_group_size=ep["group_size"],
        embed_bits=ep["bits"],
    )
