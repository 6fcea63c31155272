#!/usr/bin/env python3
"""Does MLX's attention over a padded, masked key buffer equal attention over the valid keys?
(diagnostic for compiled_decode: its static cache attends over the whole capacity bucket)

    python benchmarks/gpu/diagnose_sdpa_padding.py [--widths 128,512] [--lengths 11-20]
                                                   [--heads 20] [--bucket 256]

mlx-lm's MLA decode step (glm4_moe_lite, DeepSeek-V3) calls SDPA with one query per head,
the latent cache as keys and values (width `kv_lora_rank`) and the rope scores as an array
mask. The static cache gives it the bucket's keys, the positions past the valid ones masked
with the dtype's minimum. Per width and valid length this prints whether the padded call is
bitwise the unpadded one, for SDPA and for each op of MLX's unfused fallback (scores matmul,
softmax, output matmul: mlx/fast.cpp), and for the rope scores that become SDPA's mask
((q_pe * scale) @ k_pe^T at the rope width), so the op that differs is named.
"""

from __future__ import annotations

import argparse

import mlx.core as mx


def _ints(text: str, name: str) -> list[int]:
    """'a,b,c' or 'a-b' (inclusive) -> positive ints; ValueError names the option."""
    try:
        if "-" in text:
            lo, hi = (int(t) for t in text.split("-", 1))
            values = list(range(lo, hi + 1))
        else:
            values = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} takes 'a,b,c' or 'a-b' (integers), got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} takes positive integers, got {text!r}")
    return values


def _same(a: mx.array, b: mx.array) -> str:
    if mx.array_equal(a, b).item():
        return "bitwise"
    return f"{mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item():.2g}"


def compare(width: int, n: int, heads: int, bucket: int, rope: int = 64, dtype=mx.bfloat16) -> dict[str, str]:
    """Valid length `n` against the same keys padded to `bucket`: per op, 'bitwise' or the
    largest |difference|."""
    key = mx.random.key(1000 * width + n)
    kq, kk, kp, kr = mx.random.split(key, 4)
    scale = width**-0.5
    q = mx.random.normal((1, heads, 1, width), key=kq).astype(dtype)
    kv = mx.random.normal((1, 1, n, width), key=kk).astype(dtype)
    pe = (mx.random.normal((1, heads, 1, n), key=kp) * 0.1).astype(dtype)
    pad = bucket - n
    kv_pad = mx.concatenate([kv, mx.zeros((1, 1, pad, width), dtype)], axis=2)
    low = mx.array(mx.finfo(dtype).min, dtype)
    pe_pad = mx.concatenate([pe, mx.broadcast_to(low, (1, heads, 1, pad))], axis=3)

    def fallback(k, mask):
        # mlx/fast.cpp's fallback for n_kv_heads 1: q scaled, heads as the repeats of one kv head
        qs = (mx.array(scale, dtype) * q).reshape(1, 1, heads, 1, width)
        kk_ = mx.expand_dims(k, 2)
        scores = qs @ kk_.swapaxes(-1, -2)
        probs = mx.softmax(scores + mask.reshape(1, 1, heads, 1, -1), axis=-1, precise=True)
        return scores, probs, probs @ kk_

    short, long_ = fallback(kv, pe), fallback(kv_pad, pe_pad)
    # the rope scores: (q_pe * scale) @ k_pe^T over the valid keys and over the padded bucket
    q_pe = mx.random.normal((1, heads, 1, rope), key=kr).astype(dtype) * mx.array(scale, dtype)
    k_pe = mx.random.normal((1, 1, n, rope), key=kp).astype(dtype)
    k_pe_pad = mx.concatenate([k_pe, mx.zeros((1, 1, pad, rope), dtype)], axis=2)
    pe_short, pe_long = q_pe @ k_pe.swapaxes(-1, -2), q_pe @ k_pe_pad.swapaxes(-1, -2)
    sdpa = mx.fast.scaled_dot_product_attention(q, kv, kv, scale=scale, mask=pe)
    sdpa_pad = mx.fast.scaled_dot_product_attention(q, kv_pad, kv_pad, scale=scale, mask=pe_pad)
    mx.eval(short, long_, sdpa, sdpa_pad, pe_short, pe_long)
    return {
        "rope scores": _same(pe_short, pe_long[..., :n]),
        "sdpa": _same(sdpa, sdpa_pad),
        "scores": _same(short[0], long_[0][..., :n]),
        "softmax": _same(short[1], long_[1][..., :n]),
        "output": _same(short[2], long_[2]),
        "fallback = sdpa": _same(short[2].reshape(sdpa.shape), sdpa),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="128,512", help="latent widths (kv_lora_rank)")
    parser.add_argument("--lengths", default="11-20", help="valid key lengths")
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--bucket", type=int, default=256)
    parser.add_argument("--rope", type=int, default=64, help="rope width (qk_rope_head_dim)")
    args = parser.parse_args(argv)
    try:
        widths = _ints(args.widths, "--widths")
        lengths = _ints(args.lengths, "--lengths")
        if args.heads < 1 or args.rope < 1:
            raise ValueError(f"--heads and --rope must be >= 1, got {args.heads}, {args.rope}")
        if args.bucket <= max(lengths):
            raise ValueError(f"--bucket must exceed every length, got {args.bucket}")
    except ValueError as e:
        print(f"error: {e}")
        return 2
    print(f"device {mx.default_device()}  heads {args.heads}  bucket {args.bucket}  bfloat16")
    cols = ["rope scores", "sdpa", "scores", "softmax", "output", "fallback = sdpa"]
    print(f"{'width':>5} {'keys':>4}  " + "  ".join(f"{c:<15}" for c in cols))
    for w in widths:
        for n in lengths:
            row = compare(w, n, args.heads, args.bucket, args.rope)
            print(f"{w:>5} {n:>4}  " + "  ".join(f"{row[c]:<15}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
