"""glm47_rope: MLA's decode RoPE of q_pe and k_pe (and q_pe's attention scale) in one launch.

Stock, per attention layer and decoded token (mlx-lm `Glm4MoeLiteAttention`):

    q_pe = rope(q[..., nope:])           # mx.fast.rope, traditional, a strided slice of q
    k_pe = rope(kv[..., rank:])          # mx.fast.rope of the kv projection's tail
    pe_scores = (q_pe * scale) @ k_pe^T  # the multiply is a third launch

Here one launch reads q and kv where the projections wrote them (no copies) and writes
q_pe * scale and k_pe, bitwise what those three launches give:
- cos and sin come from a table made by `mx.fast.rope` itself: the rotation of the pair
  (1, 0) by theta is (cos theta, sin theta) exactly (1 * cos - 0 * sin), so the table
  holds the very values the stock kernel computes on this backend (CUDA's exp2f/cosf/sinf,
  Metal's fast::cos/sin). It is float32, (positions, dims) interleaved like a
  traditional-RoPE row, shared by all layers, and grown in powers of two as positions
  advance (`rope_table`), never `max_position_embeddings` rows up front.
- the rotation in float32 as MLX's rope kernel is compiled: on CUDA `fmaf(x1, c, -(x2 *
  s))` and `fmaf(x1, s, x2 * c)` with the products rounded (nvcc contracts MLX's
  `x1 * c - x2 * s`); on Metal the expression as MLX's Metal kernel writes it. Then the
  rounding to T, and the scale multiply in T (`float(T(rx)) * T(scale)`, one rounding:
  the product of two values of T is exact in float32).
YaRN (mlx-lm's `YarnRoPE`: DeepSeek-V3, Kimi-K2) is the same rotation with custom
frequencies and an input scale, and stays exact by the same rules:
- the table is made by `mx.fast.rope(..., base=None, freqs=freqs)` itself, so each row
  inherits stock's theta with those frequencies (MLX's kernels: `inv_freq = 1.0 / freqs[i]`,
  `theta = (scale * float(position)) * inv_freq`, the same cos/sin): what stock's rope of any
  x at that position rotates by, since the angle does not depend on x.
- stock scales x by `mscale` in x's dtype *before* its rope (`x.at[..., :dims].multiply`,
  skipped at mscale 1); the kernel rotates float(T(x * T(mscale))) (csrc/glm47_rope.h's
  ZMLX_ROPE_IN), the value stock's rope reads. The attention scale's YaRN factor
  (mscale_all_dim squared) is already in the module's `scale`.
One thread per rotated pair: B * (H + 1) rows (H query heads and the one key head) of
RD / 2 pairs. The kernel reads the position's table row, passed as a view of the table
(no recompile per token, and no per-token array made on the host, which MLX's CUDA
backend would put in managed memory for the kernel to fault in).

Device code: BODY below; the rotation as each backend rounds it (ZMLX_ROPE_X1/X2) and
YaRN's input scale (ZMLX_ROPE_IN) are csrc/glm47_rope.h.
"""

from __future__ import annotations

from typing import cast

import mlx.core as mx

from zmlx import backend as _backend
from zmlx.kernels.core import KernelDef, Launch, Skip, device_code, float_bits

_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def reference(q, kv, table, offset, *, heads, rope_dims, base, rope_scale, scale, freqs=None, mscale=1.0):
    """q (B, 1, heads * (nope + rope_dims)) and kv (B, 1, rank + rope_dims), the query and
    kv projections' outputs at decode; offset: the cache position (int). YaRN: base None,
    `freqs` and `mscale` as mlx-lm's YarnRoPE holds them (`_freqs`, `mscale`).

    -> (q_pe * scale (B, heads, 1, rope_dims), k_pe (B, 1, 1, rope_dims)), as mlx-lm
    computes them (reshape, transpose, split, `nn.RoPE` / `YarnRoPE` = `mx.fast.rope`,
    multiply). `table` is the kernel's (see `rope_table`); the reference does not need it."""
    b, n, _ = q.shape
    q = q.reshape(b, n, heads, -1).transpose(0, 2, 1, 3)
    _, q_pe = mx.split(q, [q.shape[-1] - rope_dims], axis=-1)
    _, k_pe = mx.split(kv, [kv.shape[-1] - rope_dims], axis=-1)
    k_pe = k_pe.reshape(b, n, 1, rope_dims).transpose(0, 2, 1, 3)
    rope = dict(base=base, rope_scale=rope_scale, freqs=freqs, mscale=mscale)
    q_pe, k_pe = stock_rope(q_pe, k_pe, offset, rope_dims, **rope)
    return q_pe * scale, k_pe


def stock_rope(q_pe, k_pe, offset, rope_dims, *, base, rope_scale, freqs=None, mscale=1.0):
    """mlx-lm's rope of q_pe and k_pe at `offset`: nn.RoPE's `mx.fast.rope`, or YarnRoPE's
    (base None): the input times `mscale` in its dtype, then the rope with `freqs`."""
    if mscale != 1.0:  # YarnRoPE scales its input in the input's dtype, before the rope
        q_pe = q_pe.at[..., :rope_dims].multiply(mscale)
        k_pe = k_pe.at[..., :rope_dims].multiply(mscale)
    rope = dict(traditional=True, base=base, scale=rope_scale, offset=offset, freqs=freqs)
    return mx.fast.rope(q_pe, rope_dims, **rope), mx.fast.rope(k_pe, rope_dims, **rope)


_TABLES: dict[tuple, mx.array] = {}
MIN_TABLE_ROWS = 256
# id(freqs) -> (freqs, its values): the entry holds the array, so its id stays its own; a
# decode step looks its table up without reading the frequencies back from the device.
_FREQS: dict[int, tuple[mx.array, tuple[float, ...]]] = {}


def _freqs_key(freqs: mx.array | None) -> tuple[float, ...] | None:
    if freqs is None:
        return None
    hit = _FREQS.get(id(freqs))
    if hit is None:
        values = cast("list[float]", freqs.astype(mx.float32).tolist())  # a 1-D array's values
        hit = _FREQS[id(freqs)] = (freqs, tuple(values))
    return hit[1]


def rope_table(
    rope_dims: int, base: float | None, rope_scale: float, positions: int, *, freqs: mx.array | None = None
) -> mx.array:
    """float32 (N, rope_dims) with N >= positions a power of two (at least 256): row p holds
    (cos, sin) of each pair at position p, as `mx.fast.rope(traditional=True)` computes them
    on the current backend, with `base` or (YaRN: base None) with `freqs`. Cached per backend
    and RoPE parameters (the frequencies' values: every layer's YarnRoPE shares one table); a
    longer context makes the next power of two (the old table is dropped)."""
    key = (
        _backend.current(),
        rope_dims,
        None if base is None else float(base),
        float(rope_scale),
        _freqs_key(freqs),
    )
    table = _TABLES.get(key)
    if table is not None and table.shape[0] >= positions:
        return table
    n = max(MIN_TABLE_ROWS, 1 << max(positions - 1, 0).bit_length())
    ones = mx.broadcast_to(mx.array([1.0, 0.0], mx.float32), (1, 1, n, rope_dims // 2, 2))
    # materialized: with one pair the reshape is a view whose positions have stride 0, and
    # MLX's CUDA rope then turns row p by another position's angle (H200, rope of 2 dims:
    # row 257 held position 7's; log 20261202-h200-switch-gqa-prologue-25a0157.log)
    table = mx.fast.rope(
        mx.contiguous(ones.reshape(1, 1, n, rope_dims)),
        rope_dims,
        traditional=True,
        base=base,
        scale=rope_scale,
        offset=0,
        freqs=freqs,
    ).reshape(n, rope_dims)
    _TABLES[key] = table
    return table


BODY = """
const uint row = zmlx_tid / (RD / 2);
const uint i = zmlx_tid % (RD / 2);
if (row < NROWS) {
    const uint b = row / (H + 1);
    const uint h = row % (H + 1);
    const float c = cs[2 * i];
    const float s = cs[2 * i + 1];
    if (h < H) {
        const size_t src = (size_t(b) * H + h) * QW + NOPE + 2 * i;
        const float x1 = ZMLX_ROPE_IN(static_cast<float>(q[src]));
        const float x2 = ZMLX_ROPE_IN(static_cast<float>(q[src + 1]));
        const float sc = ZMLX_FLOAT_BITS(SCALE_BITS);
        const size_t dst = (size_t(b) * H + h) * RD + 2 * i;
        const T r1 = static_cast<T>(ZMLX_ROPE_X1(x1, x2, c, s));
        const T r2 = static_cast<T>(ZMLX_ROPE_X2(x1, x2, c, s));
        q_pe[dst] = static_cast<T>(ZMLX_MUL(static_cast<float>(r1), sc));
        q_pe[dst + 1] = static_cast<T>(ZMLX_MUL(static_cast<float>(r2), sc));
    } else {
        const size_t src = size_t(b) * KVW + RANK + 2 * i;
        const float x1 = ZMLX_ROPE_IN(static_cast<float>(kv[src]));
        const float x2 = ZMLX_ROPE_IN(static_cast<float>(kv[src + 1]));
        k_pe[size_t(b) * RD + 2 * i] = static_cast<T>(ZMLX_ROPE_X1(x1, x2, c, s));
        k_pe[size_t(b) * RD + 2 * i + 1] = static_cast<T>(ZMLX_ROPE_X2(x1, x2, c, s));
    }
}
"""

_SCALES: dict[tuple, int] = {}


def scale_bits(scale: float, dtype) -> int:
    """The bits of float(T(scale)): mlx-lm's `q_pe * scale` (and YarnRoPE's input multiply by
    mscale) rounds the Python float to q_pe's dtype first (a weakly typed scalar)."""
    key = (scale, dtype)
    if key not in _SCALES:
        _SCALES[key] = float_bits(mx.array(scale, dtype=dtype).astype(mx.float32).item())
    return _SCALES[key]


def launch(
    backend, q, kv, table, offset, *, heads, rope_dims, base, rope_scale, scale, freqs=None, mscale=1.0
) -> Launch | Skip:
    if q.dtype not in _DTYPES or kv.dtype != q.dtype:
        return Skip(f"q {q.dtype}, kv {kv.dtype} (one float dtype needed)")
    if q.ndim != 3 or kv.ndim != 3 or q.shape[1] != 1 or kv.shape[:2] != q.shape[:2]:
        return Skip(f"q {q.shape}, kv {kv.shape}: one token per sequence (decode) only")
    if not isinstance(offset, int) or offset < 0:
        return Skip(f"offset {offset!r}: one int position for the batch needed")
    if rope_dims % 2 or q.shape[-1] % heads or q.shape[-1] // heads < rope_dims or kv.shape[-1] < rope_dims:
        return Skip(f"rope_dims {rope_dims} does not fit q {q.shape} with {heads} heads and kv {kv.shape}")
    if (
        table.dtype != mx.float32
        or table.ndim != 2
        or table.shape[1] != rope_dims
        or table.shape[0] <= offset
    ):
        return Skip(f"table {table.shape} {table.dtype} does not cover position {offset}")
    b = q.shape[0]
    qw = q.shape[-1] // heads
    nrows = b * (heads + 1)
    n = nrows * (rope_dims // 2)
    return Launch(
        inputs=[q, kv, table[offset : offset + 1]],  # the position's row: a view
        template=[
            ("T", q.dtype),
            ("H", heads),
            ("QW", qw),
            ("NOPE", qw - rope_dims),
            ("KVW", kv.shape[-1]),
            ("RANK", kv.shape[-1] - rope_dims),
            ("RD", rope_dims),
            ("NROWS", nrows),
            ("SCALE_BITS", scale_bits(scale, q.dtype)),
            ("MSCALE_BITS", scale_bits(mscale, q.dtype)),  # the frequencies are the table's
        ],
        grid=(n, 1, 1),
        threadgroup=(min(256, n), 1, 1),
        output_shapes=[(b, heads, 1, rope_dims), (b, 1, 1, rope_dims)],
        output_dtypes=[q.dtype, q.dtype],
    )


def example():
    # GLM-4.7-Flash's rope (64 dims, base 1e6) with fewer heads and a shorter nope/rank
    kw = dict(heads=5, rope_dims=64, base=1_000_000.0, rope_scale=1.0, scale=(16 + 64) ** -0.5)
    q = mx.random.normal((1, 1, 5 * (16 + 64)), key=mx.random.key(41)).astype(mx.bfloat16)
    kv = mx.random.normal((1, 1, 48 + 64), key=mx.random.key(42)).astype(mx.bfloat16)
    return (q, kv, rope_table(64, kw["base"], kw["rope_scale"], 300), 257), kw


glm47_rope = KernelDef(
    name="glm47_rope",
    reference=reference,
    body=BODY,
    header=device_code("glm47_rope.h"),
    input_names=("q", "kv", "cs"),
    output_names=("q_pe", "k_pe"),
    launch=launch,
    example=example,
)
