"""Per-layer decoding caches for the LFM2 backbone, one list in layer order.

Short-conv layers keep the last `L_cache - 1` conv inputs (`ConvCache`); attention layers keep keys
and values (`KVCache`). The conv state is a running summary that cannot be trimmed back, so reusing
a prompt prefix means keeping a snapshot (`snapshot()`) of the whole list at that point.

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
