"""moe_combine: weighted sum of the routed experts' outputs plus the shared expert."""

from __future__ import annotations

import mlx.core as mx

from zmlx.kernels._core import KernelDef


def reference(y: mx.array, scores: mx.array, shared: mx.array | None = None) -> mx.array:
    """y (..., k, D) expert outputs, scores (..., k) float32, shared (..., D) or None.

    mlx-lm's order and dtypes: the product and sum promote to float32, the sum is
    rounded back to y's dtype, then the shared expert is added in that dtype.
    """
    out = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
    if shared is not None:
        out = out + shared
    return out


moe_combine = KernelDef(name="moe_combine", reference=reference)
