"""Per-layer decoding caches for the LFM2 backbone, one list in layer order.

Short-conv layers keep the last `L_cache - 1` conv inputs (`ConvCache`); attention layers keep keys
and values (`KVCache`). The conv state is a running summary that cannot be trimmed back, so reusing
a prompt prefix means keeping a snapshot (`snapshot()`) of the whole list at that point.

Many requests decoded together (`batch.py`) keep one row per request (`BatchKVCache`,
`BatchConvCache`), each built from a request's own cache after its prompt ran alone: rows of
different lengths are aligned on the right, and the left padding of a row is masked out of every
softmax (`BatchKVCache.make_mask`); conv states hold no padding at all.

These are written here rather than taken from `mlx_lm.models.cache` because importing any part of
`mlx_lm` runs its package `__init__`, which imports `transformers` (seconds and ~1 GB at start).
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one attention layer, grown in steps to avoid a copy per token."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, heads, L, head_dim) keys/values; return all of them so far."""
        start = self.offset
        needed = start + keys.shape[2]
        if self.keys is None or needed > self.keys.shape[2]:
            B, H, _, D = keys.shape
            capacity = ((needed + self.step - 1) // self.step) * self.step
            grown_k = mx.zeros((B, H, capacity, D), keys.dtype)
            grown_v = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
            if self.keys is not None:
                grown_k[..., :start, :] = self.keys[..., :start, :]
                grown_v[..., :start, :] = self.values[..., :start, :]
            self.keys, self.values = grown_k, grown_v
        self.keys[..., start:needed, :] = keys
        self.values[..., start:needed, :] = values
        self.offset = needed
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    def snapshot(self) -> KVCache:
        """An independent copy: later updates to either do not affect the other."""
        copy = KVCache()
        if self.keys is not None:
            # Slicing makes new arrays, so the copy never sees in-place writes to this cache.
            copy.keys = self.keys[..., : self.offset, :]
            copy.values = self.values[..., : self.offset, :]
        copy.offset = self.offset
        return copy

    def trim(self, n: int) -> None:
        """Forget the last `n` positions (attention state can be trimmed; conv state cannot)."""
        self.offset = max(self.offset - n, 0)

    def make_mask(self, L: int) -> str | None:
        """The attention mask for L new queries: causal, aligned on the last key."""
        return "causal" if L > 1 else None


class ConvCache:
    """The last `L_cache - 1` inputs of one short-conv layer, shape (B, L_cache - 1, D)."""

    def __init__(self) -> None:
        self.conv_state: mx.array | None = None
        self.offset = 0

    @property
    def state(self) -> list[mx.array]:
        return [] if self.conv_state is None else [self.conv_state]

    def snapshot(self) -> ConvCache:
        copy = ConvCache()
        copy.conv_state = self.conv_state
        copy.offset = self.offset
        return copy


def snapshot(cache: list[KVCache | ConvCache]) -> list[KVCache | ConvCache]:
    """Copy a whole cache list, e.g. to reuse a prompt prefix for several continuations."""
    return [layer_cache.snapshot() for layer_cache in cache]


class BatchKVCache:
    """Keys and values of one attention layer for B rows, right-aligned: row b's positions are
    buffer indices left[b] .. length - 1, and indices before left[b] are padding that no query
    sees (`make_mask`). A step appends one position to every row."""

    step = 256

    def __init__(self, keys: mx.array, values: mx.array, left: list[int]):
        self.length = keys.shape[2]
        self.keys, self.values, self.left = keys, values, list(left)

    @classmethod
    def from_rows(cls, rows: list[KVCache]) -> BatchKVCache:
        """One batch of the given single-row caches (each (1, H, offset, d))."""
        length = max(row.offset for row in rows)
        keys, values, left = [], [], []
        for row in rows:
            pad = length - row.offset
            k, v = row.state
            keys.append(mx.pad(k, [(0, 0), (0, 0), (pad, 0), (0, 0)]))
            values.append(mx.pad(v, [(0, 0), (0, 0), (pad, 0), (0, 0)]))
            left.append(pad)
        return cls(mx.concatenate(keys), mx.concatenate(values), left)

    @property
    def offset(self) -> mx.array:
        """Each row's own position for the next token, (B,)."""
        return mx.array([self.length - left for left in self.left], mx.int32)

    def make_mask(self, L: int) -> mx.array:
        """(B, 1, L, length + L) booleans: query i of row b sees keys from left[b] up to its own
        position (length + i)."""
        keys = mx.arange(self.length + L)
        queries = mx.arange(self.length, self.length + L)
        causal = keys[None, :] <= queries[:, None]
        past_padding = keys[None, :] >= mx.array(self.left)[:, None]
        return mx.logical_and(causal[None], past_padding[:, None])[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start, needed = self.length, self.length + keys.shape[2]
        if needed > self.keys.shape[2]:
            grow = -(-(needed - self.keys.shape[2]) // self.step) * self.step
            pad = [(0, 0), (0, 0), (0, grow), (0, 0)]
            self.keys, self.values = mx.pad(self.keys, pad), mx.pad(self.values, pad)
        self.keys[..., start:needed, :] = keys
        self.values[..., start:needed, :] = values
        self.length = needed
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    def extend(self, other: BatchKVCache) -> None:
        """Append other's rows after this cache's, aligning both on the right."""
        length = max(self.length, other.length)
        parts = []
        for cache in (self, other):
            pad = length - cache.length
            k, v = cache.keys[..., : cache.length, :], cache.values[..., : cache.length, :]
            widths = [(0, 0), (0, 0), (pad, 0), (0, 0)]
            parts.append((mx.pad(k, widths), mx.pad(v, widths), [x + pad for x in cache.left]))
        (k1, v1, l1), (k2, v2, l2) = parts
        self.keys, self.values = mx.concatenate([k1, k2]), mx.concatenate([v1, v2])
        self.left, self.length = l1 + l2, length

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices, in order); padding every kept row has is dropped."""
        index = mx.array(rows)
        drop = min(self.left[r] for r in rows)
        self.keys = self.keys[index, :, drop : self.length, :]
        self.values = self.values[index, :, drop : self.length, :]
        self.left = [self.left[r] - drop for r in rows]
        self.length -= drop

    def single(self) -> KVCache:
        """The cache of a batch of one row (with no padding left: see `keep`) as a KVCache."""
        assert len(self.left) == 1 and self.left[0] == 0
        cache = KVCache()
        cache.keys, cache.values, cache.offset = self.keys, self.values, self.length
        return cache

    @property
    def state(self) -> list[mx.array]:
        return [self.keys[..., : self.length, :], self.values[..., : self.length, :]]


class BatchConvCache:
    """The conv states of one short-conv layer for B rows, (B, L_cache - 1, D): a step feeds one
    input to every row, so rows need no alignment and there is no padding."""

    def __init__(self, conv_state: mx.array):
        self.conv_state = conv_state
        self.offset = 0  # the model advances it; rows keep their own positions elsewhere

    @classmethod
    def from_rows(cls, rows: list[ConvCache]) -> BatchConvCache:
        return cls(mx.concatenate([row.conv_state for row in rows]))

    def extend(self, other: BatchConvCache) -> None:
        self.conv_state = mx.concatenate([self.conv_state, other.conv_state])

    def keep(self, rows: list[int]) -> None:
        self.conv_state = self.conv_state[mx.array(rows)]

    def single(self) -> ConvCache:
        cache = ConvCache()
        cache.conv_state = self.conv_state
        return cache

    @property
    def state(self) -> list[mx.array]:
        return [self.conv_state]
