#!/usr/bin/env python3
"""Where the tiny synthetic model goes wrong on a GPU backend (diagnostic, prints a table).

    python benchmarks/gpu/diagnose_tiny.py [synth:glm4_moe_lite/tiny/affine4]

1. stock forward passes of M tokens (no cache): are the logits finite?
2. each pattern alone on a fresh model: prompt + 3 decode steps, stock then patched:
   finite, bitwise equal, and are the model's parameters unchanged afterwards.
"""

from __future__ import annotations

import sys

import mlx.core as mx
from mlx.utils import tree_flatten

import zmlx
from zmlx import synth
from zmlx.fidelity import greedy_logits


def finite(xs) -> str:
    return "".join("y" if mx.isfinite(x).all().item() else "N" for x in xs)


def main(spec: str) -> None:
    model, _ = synth.build(spec)
    print(f"backend {zmlx.backend.current()}  model {spec}")
    for m in (1, 2, 7, 8, 9, 16, 33):
        x = mx.arange(1, m + 1)[None] % 1000
        out = model(x)
        mx.eval(out)
        print(f"stock forward M={m:3d}: finite={finite([out])}")
    prompt = mx.array([[3, 14, 15, 92, 65, 35, 89]])
    for patterns in (
        ["moe_router"],
        ["moe_combine"],
        ["moe_mlp"],
        ["downproj_combine"],
        ["swiglu_mlp"],
        ["residual_norm"],
        ["glm47_rope"],
        ["mla_attention"],
        ["moe_router", "moe_mlp", "downproj_combine"],
    ):
        model, _ = synth.build(spec)
        before = {k: mx.array(v) for k, v in tree_flatten(model.parameters())}
        mx.eval(before)
        stock = greedy_logits(model, prompt, 3)
        result = zmlx.patch(model, patterns=patterns)
        paths = {n: r.path for n, r in result.patterns.items()}
        try:
            patched = greedy_logits(model, prompt, 3)
        finally:
            zmlx.unpatch(model)
        after = dict(tree_flatten(model.parameters()))
        changed = [k for k, v in before.items() if not mx.array_equal(v, after[k], equal_nan=True).item()]
        equal = "".join("=" if mx.array_equal(s, p).item() else "x" for s, p in zip(stock, patched))
        print(
            f"{','.join(patterns):40s} paths={paths} stock={finite(stock)} patched={finite(patched)} "
            f"equal={equal} params_changed={changed[:3]}{'...' if len(changed) > 3 else ''}"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "synth:glm4_moe_lite/tiny/affine4")
