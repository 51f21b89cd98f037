"""Attention, activations and matmuls for MLX's CPU backend (measured with MLX 0.32 on x86-64).

Two things make MLX's own ops slow on the CPU:

- Transcendental functions run one element at a time through a slow `exp` (~12 ns per
  element: a 12 x 1024 x 1024 softmax, one vision attention layer, takes ~150 ms). `_exp` below
  is the classic Cody-Waite + polynomial exp, written in MLX ops and compiled into one loop:
  5x faster, within 1e-7 relative of `mx.exp`.
- Every op but a float32 BLAS matmul runs on one thread, and so does a matmul of one row (a
  decode step). MLX runs each stream on a thread of its own, so attention splits its heads,
  and a one-row matmul its weight rows, into one group per CPU stream ("lanes") that run side
  by side.

Everything here is plain MLX; `cpu.layers` installs it on a loaded model. The polynomial paths
are float32 only: other dtypes get MLX's own ops.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable

import mlx.core as mx

from .blas import bf16_product_tag

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
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis of a float32 array."""
    e = _exp(x - mx.max(x, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


_GELU_2C = 2.0 * math.sqrt(2.0 / math.pi)


@mx.compile
def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation, as x * sigmoid(2z) (see models/siglip2.py), float32."""
    return x / (1.0 + _exp(-_GELU_2C * (x + 0.044715 * x * x * x)))


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, float32."""
    return gate / (1.0 + _exp(-gate)) * up


def _float32(x: mx.array) -> bool:
    return x.dtype == mx.float32


_per_thread = threading.local()


def lanes() -> tuple[mx.Stream, ...]:
    """CPU streams that attention spreads its heads over: one per core, at most 4.

    New streams, not the default one: work queued on the stream that also produces the inputs
    waits behind it instead of running alongside. Since MLX 0.32 a stream belongs to the
    thread that made it, so each thread gets its own.
    """
    if not hasattr(_per_thread, "lanes"):
        count = max(1, min(4, os.cpu_count() or 1))
        _per_thread.lanes = tuple(mx.new_stream(mx.cpu) for _ in range(count))
    return _per_thread.lanes


# Below this many query x key pairs per head, attention is cheap and splitting it costs more
# than it gives (a decode step, a short prompt).
_SPLIT_MIN_PAIRS = 64 * 1024
# Attention scores are computed a block of queries at a time, about this many per lane (16 MB
# in float32): the softmax reads them four times, which is cheap while a block stays in the
# cache and costly once it spills (six 512x512 tiles at once: 300 MB of scores per layer).
# Measured on a tiled 1024x768 image, 450M shapes: one batch 21.8 s, blocks of 1M 19.1 s,
# 2M 16.9 s, 4M 16.3 s, 8M 16.6 s. Causal blocks also read only the keys they may see, which
# skips about half the work of a long prompt.
_SCORE_BLOCK = 4 << 20


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = False
) -> mx.array:
    """Scaled dot-product attention. q (B, Hq, L, d); k, v (B, Hkv, S, d), Hq a multiple of Hkv.

    With `causal`, the last query lines up with the last key (a prompt chunk appended to a
    cache). Returns (B, Hq, L, d).
    """
    L, S = q.shape[2], k.shape[2]
    if L == 1 and S >= _ONE_QUERY_MIN_KEYS and _float32(q):
        return _one_query_attention(q, k, v, scale)
    if not _float32(q) or L * S < _SPLIT_MIN_PAIRS:
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
    heads = [(h0, h1) for h0, h1 in zip(bounds, bounds[1:], strict=False)]
    offset = S - L  # with `causal`, query i sees keys 0 .. offset + i
    rows = max(16, _SCORE_BLOCK // (max(h1 - h0 for h0, h1 in heads) * (Hq // Hkv) * S))
    # Each block is evaluated (on every lane at once) before the next is built: left to itself,
    # MLX would compute the scores of all blocks before any softmax, holding them all at once.
    per_lane: list[list[mx.array]] = [[] for _ in heads]
    for b in range(B):
        for start in range(0, L, rows):
            stop = min(start + rows, L)
            visible = offset + stop if causal else S
            parts = []
            for stream, (h0, h1) in zip(streams, heads, strict=False):
                with mx.stream(stream):
                    parts.append(
                        _attention_block(
                            q[b : b + 1, h0:h1, :, start:stop],
                            k[b : b + 1, h0:h1, :, :visible],
                            v[b : b + 1, h0:h1, :, :visible],
                            offset + start if causal else None,
                        )
                    )
            mx.eval(parts)
            for lane, part in zip(per_lane, parts, strict=True):
                lane.append(part)
    blocks_per_view = len(per_lane[0]) // B
    lanes_out = []
    for lane in per_lane:
        views = [
            mx.concatenate(lane[i : i + blocks_per_view], axis=-2)
            for i in range(0, len(lane), blocks_per_view)
        ]
        lanes_out.append(mx.concatenate(views, axis=0))
    out = mx.concatenate(lanes_out, axis=1)
    return out.reshape(B, Hq, L, d)


# A decode step's attention: one query per head over the whole cache. MLX's own (a fallback on
# the CPU) multiplies the query heads that share a key head as two-row products, which OpenBLAS
# runs as small blocked gemms, and its softmax uses the slow exp. Here every query head is a
# one-row product (`sgemv` through the gemv forwarder) and the softmax uses the polynomial exp.
# Measured per layer at the 450M heads (16 query, 8 key/value, 64 wide): 1800 keys 794 -> 614
# us, 1024 keys 497 -> 366 us, 512 keys 282 -> 239 us; below ~400 keys MLX's one call is faster.
_ONE_QUERY_MIN_KEYS = 512
# The compiled softmax sees the scores padded to a multiple of this many keys, so it is traced
# once per 256 decoded tokens rather than at every step (each new shape is a new trace).
_ONE_QUERY_KEY_STEP = 256


def _one_query_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """`attention` for one query (L = 1), no mask."""
    B, Hq, _, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    # Every query head its own batch entry: (B, Hkv, Hq / Hkv, 1, d).
    q = (q * scale).reshape(B, Hkv, Hq // Hkv, 1, d)
    scores = q @ k[:, :, None].swapaxes(-1, -2)
    padded = -(-S // _ONE_QUERY_KEY_STEP) * _ONE_QUERY_KEY_STEP
    scores = mx.pad(scores, [(0, 0)] * 4 + [(0, padded - S)], constant_values=-mx.inf)
    weights = softmax(scores)[..., :S]
    return (weights @ v[:, :, None]).reshape(B, Hq, 1, d)


def _attention_block(q: mx.array, k: mx.array, v: mx.array, first_row: int | None) -> mx.array:
    """Pre-scaled queries (1, h, r, n, d) on keys/values (1, h, 1, S, d); with `first_row`,
    query i (from 0) sees keys 0 .. first_row + i only."""
    scores = q @ k.swapaxes(-1, -2)
    if first_row is not None:
        n, S = scores.shape[-2:]
        rows = mx.arange(first_row, first_row + n)[:, None]
        scores = mx.where(mx.arange(S)[None] > rows, -mx.inf, scores)
    return softmax(scores) @ v


# Row-wise work on many rows (a vision MLP over six 512x512 tiles: 6144 rows; a 1800-token
# prefill) runs a block of rows at a time on the CPU, to bound its memory. A compiled activation
# that uses `_exp` is deeper than MLX fuses into one loop (11 ops), so it runs as several loops,
# each writing a full-size temporary: one 450M vision MLP on 6144 rows peaks at +522 MiB at once.
# Measured on whole requests at the 450M shapes (interleaved, medians): tiled-image vision tower
# +865 -> +435 MiB, 1800-token prefill +630 -> +416 MiB, at the same speed (prefill 10.3 vs
# 10.1 s). Smaller blocks cost speed (3M elements: prefill 10.8 s), larger ones memory.
_ROW_BLOCK = 8 << 20


def in_row_blocks(fn: Callable[[mx.array], mx.array], x: mx.array, width: int) -> mx.array:
    """`fn(x)` for a function that treats each row (last axis) of x on its own.

    On the CPU in float32 it runs over blocks of rows, each evaluated before the next is built
    (left to itself, MLX would run each step over all blocks before the next step); `width` is
    the length of fn's widest temporary per row, which sets the block size.
    """
    rows = x.size // x.shape[-1]
    block = max(64, _ROW_BLOCK // width)
    if not _float32(x) or rows <= block:
        return fn(x)
    flat = x.reshape(rows, x.shape[-1])
    parts = []
    for start in range(0, rows, block):
        part = fn(flat[start : start + block])
        mx.eval(part)
        parts.append(part)
    out = mx.concatenate(parts)
    return out.reshape(*x.shape[:-1], out.shape[-1])


# A one-row matmul smaller than this (weight elements) is not worth splitting over the lanes.
_SPLIT_MIN_WEIGHTS = 1 << 20


def split_rows(multiply: Callable[[int, int], mx.array], rows: int, cols: int) -> mx.array:
    """`multiply(0, rows)`, computed as `multiply(r0, r1)` for one row range per CPU lane.

    `multiply(r0, r1)` gives the output columns r0..r1 of a one-row input times a weight of
    `rows` x `cols` (rows 0..rows are its outputs); the parts are joined on the last axis.
    """
    streams = lanes()
    if len(streams) == 1 or rows * cols < _SPLIT_MIN_WEIGHTS:
        return multiply(0, rows)
    bounds = [round(i * rows / len(streams)) for i in range(len(streams) + 1)]
    parts = []
    for stream, r0, r1 in zip(streams, bounds, bounds[1:], strict=False):
        with mx.stream(stream):
            parts.append(multiply(r0, r1))
    return mx.concatenate(parts, axis=-1)


def reads_bf16_weights(weight: mx.array, activations: mx.Dtype) -> bool:
    """Whether `bf16_matmul` can multiply rows of `activations` by this weight: a bf16 weight
    with an even row length and float32 rows, with the forwarder that computes it preloaded
    (`blas.bf16_product_tag`)."""
    return (
        weight.dtype == mx.bfloat16
        and activations == mx.float32
        and weight.shape[-1] % 2 == 0
        and bf16_product_tag() is not None
    )


def bf16_matmul(weight: mx.array, x: mx.array) -> mx.array:
    """`x @ weight.T` for float32 rows x (..., K) and a bf16 weight (N, K), computed in float32
    from the bf16 weights as they are: the products equal those with the weight upcast to
    float32 (bf16 is float32's upper half). One row (a decode step) reads half the bytes; more
    rows skip MLX's upcast of the whole weight (~3 ns per element).

    MLX has no such kernel on the CPU; the preloaded forwarder has, reached through a tagged
    float32 matmul whose operands are the same bytes reinterpreted (see cpu/native/gemv_forward.c):
    m rows of x as 2m x K/2 floats, the weight as N x K/2 floats, out 2m x N of which the first
    m rows are the product. Only call it where `reads_bf16_weights` holds.
    """
    rows, cols = weight.shape
    flat = x.reshape(-1, cols)
    m = flat.shape[0]
    out = mx.addmm(
        mx.zeros((1,), mx.float32),  # beta = 0: never read
        flat.reshape(2 * m, cols // 2),
        weight.view(mx.float32).T,
        alpha=bf16_product_tag(),
        beta=0.0,
    )
    return out[:m].reshape(*x.shape[:-1], rows)


def matvec(weight: mx.array, x: mx.array) -> mx.array:
    """`x @ weight.T` for an input of one row (a decode step), as a matrix-vector product.

    MLX runs a one-row matmul as a general matmul, up to 4x slower than `weight @ vector` (the
    results are bitwise equal). In float32 that is a BLAS call, which uses every core; in other
    dtypes MLX's own kernel uses one, so the weight's rows are split over the lanes
    (`split_rows`: bf16 decode 3.3 -> 5.3 tokens/s at the 450M shapes; splitting float32 gained
    nothing). A bf16 weight with a float32 row is read as bf16 and multiplied in float32 where
    the forwarder can (`bf16_matmul`).
    """
    if reads_bf16_weights(weight, x.dtype):
        return bf16_matmul(weight, x)
    vector = x.reshape(-1)
    rows, cols = weight.shape
    if weight.dtype == mx.float32:
        out = weight @ vector
    else:
        out = split_rows(lambda r0, r1: weight[r0:r1] @ vector, rows, cols)
    return out.reshape(*x.shape[:-1], rows)


def quantized_matvec(layer, x: mx.array) -> mx.array:
    """`x @ W.T` for a quantized layer's W (nn.QuantizedLinear or nn.QuantizedEmbedding) and an
    input of one row, split over the lanes like `matvec` (MLX's quantized kernel uses one core:
    4-bit decode 3.3 -> 5.7 tokens/s)."""

    def multiply(r0: int, r1: int) -> mx.array:
        biases = layer.get("biases")
        return mx.quantized_matmul(
            x,
            layer["weight"][r0:r1],
            scales=layer["scales"][r0:r1],
            biases=biases[r0:r1] if biases is not None else None,
            transpose=True,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )

    return split_rows(multiply, layer["scales"].shape[0], x.shape[-1])


def project(weight: mx.array, x: mx.array) -> mx.array:
    """`x @ weight.T` by the path its shape and dtypes call for: `matvec` for one row, the
    forwarder's bf16 product for bf16 weights kept under float32 compute (MLX would upcast the
    whole weight at every call), else MLX's matmul."""
    if x.size == x.shape[-1]:
        return matvec(weight, x)
    if reads_bf16_weights(weight, x.dtype):
        return bf16_matmul(weight, x)
    return x @ weight.T
