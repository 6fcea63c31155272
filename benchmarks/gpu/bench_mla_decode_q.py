#!/usr/bin/env python3
"""Decode attention over a quantized latent cache vs a bf16 one, on a GPU: GLM-4.7-Flash's
attention core after the projections (20 heads, nope 192, rope 64, latent 512, v 256, affine
4-bit embed_q / unembed_out), per layer and token, at each context.

    python benchmarks/gpu/bench_mla_decode_q.py [--contexts 4096,32768] [--breakdown]

Rows (GPU µs per call from the profiler, launches per call, graph µs per call):
- `stock bf16`: mlx-lm's ops over a bf16 cache (what mla_kv_quant runs on a bf16 cache);
- `mla_attention bf16`: zmlx's three launches over the bf16 cache;
- `reference q<bits>`: latent_attention (mx.dequantize, mlx-lm's math) + unembed_out: the
  quantized cache without the kernel;
- `mla_decode_q q<bits>` (tensor cores) and `... fma`: mlx-lm's embed_q, mla_decode_q,
  mla_unembed: what mla_kv_quant runs on the GPU.
"""

from __future__ import annotations

from typing import Annotated

import mlx.core as mx
import typer

from zmlx import backend
from zmlx.bench import kernels as kb
from zmlx.cli import args as cli_args
from zmlx.config import ConfigError
from zmlx.kernels import mla_decode_q as mdq
from zmlx.kernels.mla_attention import mla_decode, mla_embed_q, mla_unembed
from zmlx.kernels.moe_mlp import quantized_experts
from zmlx.latent_quant import latent_attention

HEADS, NOPE, RD, R, V = 20, 192, 64, 512, 256


def cases(context: int):
    scale = (NOPE + RD) ** -0.5
    ks = mx.random.split(mx.random.key(7), 5)
    kw = dict(group_size=64, bits=4)
    q = mx.random.normal((1, 1, HEADS * (NOPE + RD)), key=ks[0]).astype(mx.bfloat16)
    embed = quantized_experts(HEADS, R, NOPE, dtype=mx.bfloat16, seed=8, **kw)
    unembed = quantized_experts(HEADS, V, R, dtype=mx.bfloat16, seed=9, **kw)
    lat = mx.random.normal((1, 1, context, R), key=ks[1]).astype(mx.bfloat16)
    kpe = mx.random.normal((1, 1, context, RD), key=ks[2]).astype(mx.bfloat16)
    q_pe = (mx.random.normal((1, HEADS, 1, RD), key=ks[3]) * 0.1).astype(mx.bfloat16)
    q_nope = q.reshape(1, 1, HEADS, NOPE + RD).transpose(0, 2, 1, 3)[..., :NOPE]
    mx.eval(q, embed, unembed, lat, kpe, q_pe)

    def stock():
        pe_scores = (q_pe * scale) @ kpe.swapaxes(-1, -2)
        q_abs = mx.quantized_matmul(q_nope, *embed, transpose=True, **kw)
        out = mx.fast.scaled_dot_product_attention(q_abs, lat, lat, scale=scale, mask=pe_scores)
        return mx.quantized_matmul(out, *unembed, transpose=True, **kw)

    def mla_bf16():
        qv = mla_embed_q(q, *embed, heads=HEADS, head_dim=NOPE + RD, nope=NOPE, **kw)
        o, m, lsum = mla_decode(qv, q_pe * scale, lat, kpe, scale=scale)
        return mla_unembed(o, m, lsum, *unembed, dtype=mx.bfloat16, **kw)

    rows = [("stock bf16", stock), ("mla_attention bf16", mla_bf16)]
    for bits in (4, 8):
        quant = dict(group_size=64, bits=bits)
        ql, qk = mx.quantize(lat, **quant), mx.quantize(kpe, **quant)
        mx.eval(ql, qk)

        def reference(ql=ql, qk=qk, quant=quant):
            q_abs = mx.quantized_matmul(q_nope, *embed, transpose=True, **kw)
            out = latent_attention(q_abs, q_pe, ql, qk, scale=scale, mask=None, **quant)
            return mx.quantized_matmul(out, *unembed, transpose=True, **kw)

        def fused(ql=ql, qk=qk, quant=quant):
            q_abs = mx.quantized_matmul(q_nope, *embed, transpose=True, **kw)
            o, m, lsum = mdq.mla_decode_q(q_abs, q_pe, *ql, *qk, scale=scale, **quant)
            return mla_unembed(o, m, lsum, *unembed, dtype=mx.bfloat16, **kw)

        rows += [(f"reference q{bits}", reference), (f"mla_decode_q q{bits}", fused)]
        rows.append((f"mla_decode_q q{bits} fma", lambda f=fused: _without_mma(f)))
    return rows


def _without_mma(fn):
    mdq.USE_MMA = False
    try:
        return fn()
    finally:
        mdq.USE_MMA = True


def main(
    contexts: Annotated[str, typer.Option()] = "4096,32768",
    breakdown: Annotated[bool, typer.Option(help="each row's kernels")] = False,
    iters: Annotated[int, typer.Option()] = 20,
):
    with cli_args.one_line_errors():  # bad input: one `error:` line, exit 2
        cli_args.at_least(1, {"--iters": iters})
        try:
            lengths = [int(c) for c in contexts.split(",")]
        except ValueError:
            raise ConfigError(f"--contexts {contexts!r}: comma-separated positive integers") from None
        cli_args.at_least(1, {"--contexts": min(lengths)})
        if backend.current() != "cuda":
            raise ConfigError(f"needs MLX's CUDA backend (this is {backend.current()}): it times GPU kernels")
    for context in lengths:
        for name, fn in cases(context):
            mx.eval(fn())
            gpu, launches = kb._profile(fn, iters)
            graph = kb._graph_us(fn, iters)
            print(f"{context:>6} {name:<26} gpu {gpu:8.1f} µs  launches {launches:4.1f}  graph {graph:8.1f}")
            if breakdown:
                for kname, n, us in kb.breakdown(fn, iters):
                    print(f"{'':>8}{us:8.1f} µs x{n:.0f}  {kname}")
    if fb := kb.fallbacks():
        print(f"fallbacks (the reference ran): {fb}")


if __name__ == "__main__":
    typer.run(main)
