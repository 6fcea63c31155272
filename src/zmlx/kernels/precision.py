"""The two precisions a kernel's reference computes in, so that each kernel writes its math once:
STOCK is mlx-lm's own ops (each result rounded to the activations' dtype T where stock rounds
it), F32 is the same math in float32 throughout, the truth of the `close` tests' accuracy bar."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx

from zmlx.kernels.quant import dequantized
from zmlx.kernels.swiglu_mlp import dense


class Precision(NamedTuple):
    # cast(a): an input as this precision reads it
    cast: Callable[[mx.array], mx.array]
    # dense(x, w, s, b, group_size, bits, mode="affine"): a (Quantized)Linear without bias
    dense: Callable[..., mx.array]


def _dense_f32(x, w, s, b, group_size, bits, mode="affine"):
    return x.astype(mx.float32) @ dequantized(w, s, b, group_size, bits, mode).T


STOCK = Precision(cast=lambda a: a, dense=dense)
F32 = Precision(cast=lambda a: a.astype(mx.float32), dense=_dense_f32)


def precision(f32: bool) -> Precision:
    return F32 if f32 else STOCK
