"""mla_decode_len: mla_decode over a static cache's whole buffers, its length a device input (close).

mla_decode reads the context length from the cache view's shape. A compiled decode step over
`zmlx.static_cache.StaticMLACache` (compiled_decode) sees the whole fixed-capacity buffers
instead, and the valid length is a device array made in the graph (the cache's position + 1),
so shapes stay fixed from token to token and the host makes no array per step. This kernel is
mla_decode's body with ZMLX_MLA_LEN_INPUT: the NUMBER of chunks is fixed by the CAPACITY (the
buffers' shape, so mla_unembed's input shapes never change within a bucket), and `n_valid`, an
int32 array of one element, says how many positions count. Those are spread over all the
chunks (`chunk_span`: a multiple of 16 positions each, the capacity's chunk size at most), so
a context that fills half a bucket keeps every threadgroup busy rather than half of them (on
the H200 at a 4096-token prompt, over 8192-position buffers, the capacity's chunks took twice
mla_decode's GPU time: log 20261130-h200x2-profile-host-kernels-4096-6c850a0.log). A chunk
past the valid positions writes the neutral partials (m = -3e38, mla_decode's own initial
max; l = 0; o = 0): mla_unembed's combine gives it weight exp(-3e38 - max) = 0 and never
subtracts two infinities, so the result equals mla_decode over the valid slice up to the
chunking of the sum.

Device code: mla_decode's, csrc/mla.h, csrc/mla_mma.h, csrc/mla_decode_fma.h and
csrc/mla_decode_body.h, with ZMLX_MLA_LEN_INPUT.
"""

from __future__ import annotations

import math

import mlx.core as mx

from zmlx.kernels.core import KernelDef, Launch, Skip, device_code
from zmlx.kernels.mla_attention import _dot, chunk_size, decode_launch

# The neutral max of a chunk with no valid position: mla_decode's initial running max.
EMPTY_MAX = -3.0e38


def chunk_span(capacity: int, length: int) -> int:
    """Positions a chunk covers when the first `length` of `capacity` buffered positions count
    (the device's zmlx_mla_span, csrc/mla.h): the capacity's chunk size when all count, else
    the smallest multiple of 16 that spreads them over all the capacity's chunks (at most the
    chunk size). Chunk c starts at c * chunk_span."""
    ch = chunk_size(capacity)
    if length >= capacity:
        return ch
    per = -(-max(length, 0) // math.ceil(capacity / ch))
    return min(ch, max(16, 16 * -(-per // 16)))


def reference(qv, q_pe, lat, kpe, n_valid, *, scale):
    """As mla_attention's decode_reference over the buffers' S positions, with the number of
    chunks C that S fixes, but only positions < n_valid[0] count, chunk c holding those in
    [c * span, (c + 1) * span) (chunk_span, computed here from the device length): o (B, C, H,
    R), m (B, C, H), l (B, C, H); a chunk with none of them has m EMPTY_MAX, l 0, o 0. The
    length stays a device array (one trace for every length under mx.compile)."""
    cap = lat.shape[2]
    ch = chunk_size(cap)
    c = math.ceil(cap / ch)
    lat = lat[:, 0].astype(mx.float32)  # (B, S, R)
    kpe = kpe[:, 0].astype(mx.float32)
    scores = scale * _dot(qv[:, :, None, :], lat[:, None]) + _dot(
        q_pe[:, :, 0, None].astype(mx.float32), kpe[:, None]
    )  # (B, H, S)
    sl = mx.minimum(n_valid.reshape(-1)[:1].astype(mx.int32), cap)  # (1,)
    per = (mx.maximum(sl, 0) + c - 1) // c
    span = mx.where(sl >= cap, ch, mx.minimum(mx.maximum(16 * ((per + 15) // 16), 16), ch))
    j = mx.arange(ch, dtype=mx.int32)
    idx = mx.arange(c, dtype=mx.int32)[:, None] * span + j[None, :]  # (C, CH): chunk c's rows
    ok = (j[None, :] < span) & (idx < sl)
    rows = mx.minimum(idx, cap - 1).reshape(-1)
    bsz, heads = scores.shape[:2]
    scores = mx.take(scores, rows, axis=2).reshape(bsz, heads, c, ch).transpose(0, 2, 1, 3)
    scores = mx.where(ok[None, :, None, :], scores, -mx.inf)  # (B, C, H, CH)
    # a chunk of -inf scores keeps EMPTY_MAX as its max, so exp(-inf - m) = 0, never NaN
    m = mx.maximum(scores.max(axis=-1), EMPTY_MAX)
    e = mx.exp(scores - m[..., None])
    lat = mx.take(lat, rows, axis=1).reshape(bsz, c, ch, -1)  # (B, C, CH, R)
    o = _dot(e[..., None, :], lat[:, :, None].swapaxes(-1, -2))  # (B, C, H, R)
    return o, m, e.sum(axis=-1)


def launch(backend, qv, q_pe, lat, kpe, n_valid, *, scale) -> Launch | Skip:
    if not isinstance(n_valid, mx.array) or n_valid.dtype != mx.int32 or n_valid.shape != (1,):
        return Skip(f"n_valid {getattr(n_valid, 'shape', n_valid)!r}: an int32 array of shape (1,) needed")
    spec = decode_launch(backend, qv, q_pe, lat, kpe, scale=scale)
    if isinstance(spec, Skip):
        return spec
    spec.inputs.append(n_valid)  # the caller's own array: none is made per call
    return spec


def _example():
    qv = mx.random.normal((1, 3, 128), key=mx.random.key(61))
    q_pe = mx.random.normal((1, 3, 1, 64), key=mx.random.key(62)).astype(mx.bfloat16)
    lat = mx.random.normal((1, 1, 256, 128), key=mx.random.key(63)).astype(mx.bfloat16)
    kpe = mx.random.normal((1, 1, 256, 64), key=mx.random.key(64)).astype(mx.bfloat16)
    return (qv, q_pe, lat, kpe, mx.array([150], mx.int32)), {"scale": 0.125}


mla_decode_len = KernelDef(
    name="mla_decode_len",
    reference=reference,
    fidelity="close",
    reference_is_stock=False,  # a float32 computation, not mlx-lm's bf16 op sequence
    tolerance=1e-4,
    body="#define ZMLX_MLA_LEN_INPUT 1\n" + device_code("mla_decode_body.h"),
    header=device_code("mla.h", "mla_mma.h", "mla_decode_fma.h"),
    input_names=("qv", "q_pe", "lat", "kpe", "n_valid"),
    output_names=("o", "m", "l"),
    launch=launch,
    example=_example,
)
