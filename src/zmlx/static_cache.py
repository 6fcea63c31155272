"""A fixed-capacity cache for MLA attention's latent pair (glm4_moe_lite, DeepSeek-style
models) and for GQA attention's keys and values (glm4_moe, qwen3_moe, mixtral): whatever
mlx-lm keeps in a KVCache, in the same layout (the name is the first use's).

mlx-lm's `KVCache` returns a slice that grows by one position every token, so a compiled
decode step would see a new shape, and retrace, at every token. `StaticMLACache` keeps the
latent cache (`kv_latent`, `k_pe`: mlx-lm stores them as a KVCache's keys and values) in
buffers whose length is a capacity bucket (a power of two, at least `min_capacity`), grown
by copying into the next bucket when full, so shapes change only at bucket boundaries.

It has two modes:

- eager (the default, and every prompt): `update_and_fetch` writes like KVCache and
  returns the valid slice, so mlx-lm computes exactly what it computes with KVCache;
- traced (set by a compiled decode step while mx.compile traces it, `trace_at`): the
  write position is a device array, `update_and_fetch` writes there (`mx.put_along_axis`)
  and returns the full buffers, `make_mask` gives the boolean mask of the valid
  positions (mlx-lm's MLA attention masks its rope scores with it and passes them to
  SDPA as the additive mask), and `offset` is that array (RoPE takes it as its offset).

The position is held twice: `offset` (a Python int, what eager code and mlx-lm's helpers
read) and `position` (an int32 device array, what a compiled step takes and returns, so
the host makes no array per token). Eager writes and trims make the device copy stale; it
is made again from the int once, at the next compiled step.

The state is laid out as KVCache's (buffers, offset), so mlx-lm's save_prompt_cache /
load_prompt_cache, trim_prompt_cache and batch merging (`merge`: BatchKVCache) work
unchanged. load_prompt_cache finds cache classes by name in mlx_lm.models.cache, so this
module registers its class there (only adding a name): a prompt-cache file holding static
caches loads in any process that imported zmlx.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models import cache as _mlx_cache
from mlx_lm.models.cache import BatchKVCache, KVCache, _BaseCache, create_attention_mask

__all__ = ["StaticMLACache", "bucket"]


def bucket(n: int, minimum: int) -> int:
    """The capacity for `n` positions: the smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


class StaticMLACache(_BaseCache):
    """mlx-lm's cache protocol over fixed-capacity latent buffers (see the module doc).

    `keys` is the latent cache `kv_latent` (B, 1, capacity, kv_lora_rank), `values` the
    roped key part `k_pe` (B, 1, capacity, qk_rope_head_dim), as in KVCache.
    """

    # Below this, every prompt shares one bucket; it equals KVCache's allocation step, so a
    # bucket is never more than twice what KVCache would hold for the same positions.
    min_capacity = 256

    def __init__(self, min_capacity: int | None = None):
        self.keys: Any = None
        self.values: Any = None
        self._offset = 0
        self._position: mx.array | None = None  # device copy of _offset; None when stale
        self._traced: mx.array | None = None  # the write position while a step is traced
        if min_capacity is not None:
            if min_capacity < 1:
                raise ValueError(f"min_capacity must be >= 1, got {min_capacity}")
            self.min_capacity = bucket(min_capacity, 1)

    # ------------------------------------------------------------ positions

    @property
    def offset(self):
        """The number of valid positions: an int, or while a compiled step is traced the
        device array it writes at (what mlx-lm's attention gives RoPE as its offset)."""
        return self._offset if self._traced is None else self._traced

    @offset.setter
    def offset(self, value: int) -> None:
        self._check_eager("set the offset of")
        self._offset = int(value)
        self._position = None

    @property
    def position(self) -> mx.array:
        """The offset as an int32 scalar device array (made from the int when stale)."""
        if self._position is None:
            self._position = mx.array(self._offset, dtype=mx.int32)
        return self._position

    def advance(self, n: int, position: mx.array) -> None:
        """Record that a compiled step wrote `n` positions; `position` is its device offset."""
        self._offset += n
        self._position = position

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def kv_latent(self):
        return self.keys

    @property
    def k_pe(self):
        return self.values

    def _check_eager(self, what: str) -> None:
        if self._traced is not None:
            raise RuntimeError(f"cannot {what} a StaticMLACache while a compiled step is traced")

    # ------------------------------------------------------------ compiled steps

    def trace_at(self, keys, values, position) -> None:
        """Enter traced mode with these buffers (the compiled function's inputs) and write
        position; `end_trace` leaves it."""
        self.keys, self.values, self._traced = keys, values, position

    def end_trace(self) -> None:
        self._traced = None

    @staticmethod
    def _rows(position: mx.array, n: int) -> mx.array:
        """The positions a traced step writes, (1, 1, n, 1), from its device position: for
        put_along_axis (broadcast over the batch, heads and the row's values)."""
        pos = position.reshape(1, 1, 1, 1)
        return pos if n == 1 else pos + mx.arange(n, dtype=pos.dtype).reshape(1, 1, n, 1)

    def reserve(self, n: int) -> None:
        """Make room for `n` more positions, growing into the next bucket (a copy)."""
        self._check_eager("grow")
        if self.keys is not None and self._offset + n > self.capacity:
            self._grow(self._offset + n, self.keys.dtype, self.values.dtype)

    def _grow(self, needed: int, kdtype, vdtype, like=None) -> None:
        keys, values = (self.keys, self.values) if like is None else like
        B, H, _, Dk = keys.shape
        Dv = values.shape[3]
        cap = bucket(needed, self.min_capacity)
        new_k = mx.zeros((B, H, cap, Dk), kdtype)
        new_v = mx.zeros((B, values.shape[1], cap, Dv), vdtype)
        if self.keys is not None and self._offset > 0:
            n = self._offset
            new_k[..., :n, :] = self.keys[..., :n, :]
            new_v[..., :n, :] = self.values[..., :n, :]
        self.keys, self.values = new_k, new_v

    # ------------------------------------------------------------ mlx-lm's protocol

    def update_and_fetch(self, keys, values):
        if self._traced is not None:
            # Compiled step: write at the device position, return the whole buffers; the
            # mask from make_mask hides the positions past the valid ones. A scatter along
            # the position axis (one kernel on CUDA) rather than a slice update at a device
            # start (MLX's GPU DynamicSliceUpdate launches a kernel for the offset, then the
            # copy): the same values, one kernel fewer per buffer and layer.
            rows = self._rows(self._traced, keys.shape[2])
            self.keys = mx.put_along_axis(self.keys, rows, keys, axis=2)
            self.values = mx.put_along_axis(self.values, rows, values, axis=2)
            return self.keys, self.values
        prev = self._offset
        end = prev + keys.shape[2]
        if self.keys is None or end > self.capacity:
            self._grow(end, keys.dtype, values.dtype, like=(keys, values) if self.keys is None else None)
        self.keys[..., prev:end, :] = keys
        self.values[..., prev:end, :] = values
        self._offset = end
        self._position = None
        return self.keys[..., :end, :], self.values[..., :end, :]

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        if self._traced is None:
            return create_attention_mask(N, self._offset, return_array, window_size)
        # Boolean (N, capacity): query i (at position offset + i) sees positions <= its own.
        rinds = mx.arange(self.capacity)[None]
        linds = (self._traced + mx.arange(N))[:, None]
        mask = linds >= rinds
        if window_size is not None:
            mask = mask & (linds < rinds + window_size)
        return mask

    def size(self) -> int:
        return self._offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        self._check_eager("trim")
        n = min(self._offset, n)
        self._offset -= n
        self._position = None
        return n

    @property
    def state(self):
        return self.keys, self.values, self._offset

    @state.setter
    def state(self, v) -> None:
        self.keys, self.values, offset = v
        self._offset = int(offset)
        self._position = None
        self._traced = None

    @property
    def meta_state(self) -> tuple[str, ...]:
        """The bucket minimum, for mlx-lm versions whose prompt-cache files keep meta_state."""
        return (str(self.min_capacity),)

    @meta_state.setter
    def meta_state(self, v) -> None:
        if v:
            self.min_capacity = int(v[0])

    @classmethod
    def from_state(cls, state, meta_state=None):
        obj = cls()
        obj.state = state
        if meta_state:
            obj.meta_state = meta_state
        return obj

    @classmethod
    def from_kv_cache(cls, kv: KVCache, min_capacity: int | None = None) -> StaticMLACache:
        """A static cache holding `kv`'s valid positions (copied into a bucket)."""
        obj = cls(min_capacity)
        if kv.keys is not None:
            obj.update_and_fetch(kv.keys[..., : kv.offset, :], kv.values[..., : kv.offset, :])
        return obj

    @classmethod
    def merge(cls, caches):
        """Batch generation merges per-sequence caches into mlx-lm's BatchKVCache."""
        return BatchKVCache.merge(caches)


# load_prompt_cache looks classes up by name in mlx_lm.models.cache; add ours (never replace).
vars(_mlx_cache).setdefault(StaticMLACache.__name__, StaticMLACache)
