"""Attention and activations, with fast paths for MLX's CPU backend.

On a GPU these are MLX's own: `mx.fast.scaled_dot_product_attention`, `mx.sigmoid`. On MLX's
CPU backend (measured with MLX 0.32 on x86-64) two things make those slow:

- Transcendental functions run one element at a time through a slow `exp` (~12 ns per
  element: a 12 x 1024 x 1024 softmax, one vision attention layer, takes ~150 ms). `_exp` below
  is the classic Cody-Waite + polynomial exp, written in MLX ops and compiled into one loop:
  5x faster, within 1e-7 relative of `mx.exp`.
- Every op but a BLAS matmul runs on one thread. MLX runs each stream on a thread of its own,
  so attention splits its heads into one group per CPU stream ("lanes"), and the groups run
  side by side.

Both are plain MLX, so the model runs unchanged on every device; only the choice of path looks
at the device.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

# exp(x) = 2**n * exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for accuracy),
# exp(r) by a degree-7 polynomial (Cephes expf). Adding 1.5 * 2**23 rounds a float32 to an
# integer, which then also sits in the low mantissa bits: shifting those into the exponent
# field builds 2**n without a float -> int conversion.
_ROUND = 12582912.0
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 0.16666665459)
_EXP_HALF = 5.0000001201e-1
# Clamping keeps 2**n a normal float: below _EXP_MIN the result is 0 (where float32 exp
# underflows anyway), above _EXP_MAX it stays at exp(88.37) ~ 2.4e38 instead of overflowing
# towards inf at 88.72 (only a sigmoid's denominator gets there).
_EXP_MIN = -87.33
_EXP_MAX = 88.37


def _exp(x: mx.array) -> mx.array:
    """exp of a float32 array, for use inside compiled functions; exp(-inf) = 0."""
    clamped = mx.clip(x, _EXP_MIN, _EXP_MAX)
    shifted = clamped * (1 / math.log(2)) + _ROUND
    n = shifted - _ROUND
    r = clamped - n * _LN2_HI - n * _LN2_LO
    p = _EXP_POLY[0]
    for c in _EXP_POLY[1:]:
        p = p * r + c
    p = (p * r + _EXP_HALF) * r * r + r + 1.0
    # The low bits of `shifted` hold n + 0x400000: rebias them into an exponent (n + 127).
    exponent = (mx.view(shifted, mx.int32) - (0x4B400000 - 127)) << 23
    return mx.where(x < _EXP_MIN, 0.0, p * mx.view(exponent, mx.float32))


@mx.compile
def _softmax(x: mx.array) -> mx.array:
    e = _exp(x - mx.max(x, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


_GELU_2C = 2.0 * math.sqrt(2.0 / math.pi)


@mx.compile
def _gelu_tanh_cpu(x: mx.array) -> mx.array:
    return x / (1.0 + _exp(-_GELU_2C * (x + 0.044715 * x * x * x)))


@mx.compile
def _gelu_tanh(x: mx.array) -> mx.array:
    return x * mx.sigmoid(_GELU_2C * (x + 0.044715 * x * x * x))


@mx.compile
def _swiglu_cpu(gate: mx.array, up: mx.array) -> mx.array:
    return gate / (1.0 + _exp(-gate)) * up


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _fast_cpu(x: mx.array) -> bool:
    return x.dtype == mx.float32 and on_cpu()


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation (torch's `gelu_pytorch_tanh`), written with a sigmoid.

    0.5 * (1 + tanh(z)) == sigmoid(2z): the same function, one transcendental instead of the
    tanh's two exps.
    """
    return _gelu_tanh_cpu(x) if _fast_cpu(x) else _gelu_tanh(x)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up."""
    return _swiglu_cpu(gate, up) if _fast_cpu(gate) else nn.silu(gate) * up


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis."""
    return _softmax(x) if _fast_cpu(x) else mx.softmax(x, axis=-1, precise=True)


@lru_cache(maxsize=1)
def lanes() -> tuple[mx.Stream, ...]:
    """CPU streams that attention spreads its heads over: one per core, at most 4.

    New streams, not the default one: work queued on the stream that also produces the inputs
    waits behind it instead of running alongside.
    """
    return tuple(mx.new_stream(mx.cpu) for _ in range(max(1, min(4, os.cpu_count() or 1))))


# Below this many query x key pairs per head, attention is cheap and splitting it costs more
# than it gives (a decode step, a short prompt).
_SPLIT_MIN_PAIRS = 64 * 1024
# Queries per block in causal attention: each block reads only the keys it may see, which skips
# about half the work of a long prompt and bounds the memory of the scores.
_QUERY_BLOCK = 512


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = False
) -> mx.array:
    """Scaled dot-product attention. q (B, Hq, L, d); k, v (B, Hkv, S, d), Hq a multiple of Hkv.

    With `causal`, the last query lines up with the last key (a prompt chunk appended to a
    cache). Returns (B, Hq, L, d).
    """
    L, S = q.shape[2], k.shape[2]
    if not _fast_cpu(q) or L * S < _SPLIT_MIN_PAIRS:
        mask = "causal" if causal and L > 1 else None
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    B, Hq, _, d = q.shape
    Hkv = k.shape[1]
    # Group query heads by the key/value head they share: (B, Hkv, Hq / Hkv, L, d).
    q = (q * scale).reshape(B, Hkv, Hq // Hkv, L, d)
    k = k[:, :, None]
    v = v[:, :, None]
    streams = lanes()[:Hkv]
    bounds = [round(i * Hkv / len(streams)) for i in range(len(streams) + 1)]
    outs = []
    for stream, h0, h1 in zip(streams, bounds, bounds[1:], strict=False):
        with mx.stream(stream):
            outs.append(_attention_heads(q[:, h0:h1], k[:, h0:h1], v[:, h0:h1], causal))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
    return out.reshape(B, Hq, L, d)


def _attention_heads(q: mx.array, k: mx.array, v: mx.array, causal: bool) -> mx.array:
    """Attention of pre-scaled queries (B, h, r, L, d) on keys/values (B, h, 1, S, d)."""
    L, S = q.shape[3], k.shape[3]
    if not causal:
        return softmax(q @ k.swapaxes(-1, -2)) @ v
    offset = S - L  # query i sees keys 0 .. offset + i
    blocks = []
    for start in range(0, L, _QUERY_BLOCK):
        stop = min(start + _QUERY_BLOCK, L)
        visible = offset + stop
        scores = q[..., start:stop, :] @ k[..., :visible, :].swapaxes(-1, -2)
        rows = mx.arange(offset + start, offset + stop)[:, None]
        cols = mx.arange(visible)[None]
        scores = mx.where(cols > rows, -mx.inf, scores)
        blocks.append(softmax(scores) @ v[..., :visible, :])
    return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=-2)
