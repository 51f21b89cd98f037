"""The LFM2 hybrid language backbone: gated short-conv blocks and GQA attention blocks.

Module and parameter names follow the reference checkpoints (`model.language_model.*`), so
weights load without renaming: `layers.N.conv.{in_proj,conv,out_proj}`,
`layers.N.self_attn.{q,k,v,out}_proj`, `layers.N.self_attn.{q,k}_layernorm`,
`layers.N.feed_forward.w{1,2,3}`, `operator_norm`, `ffn_norm`, `embed_tokens`, `embedding_norm`
(the final norm, despite its name).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import ConvCache, KVCache
from ..config import TextConfig
from .kernels import (
    attention,
    bf16_matmul,
    in_row_blocks,
    on_cpu,
    reads_bf16_weights,
    split_rows,
    swiglu,
)


def matvec(weight: mx.array, x: mx.array) -> mx.array:
    """`x @ weight.T` for an input of one row (a decode step), as a matrix-vector product.

    On MLX's CPU backend a one-row matmul runs as a general matmul, up to 4x slower than
    `weight @ vector` (the results are bitwise equal). In float32 that is a BLAS call, which
    uses every core; in other dtypes MLX's own kernel uses one, so the weight's rows are split
    over the CPU lanes (`kernels.split_rows`: bf16 decode 3.3 -> 5.3 tokens/s at the 450M
    shapes; splitting float32 gained nothing). A bf16 weight with a float32 row is read as bf16
    and multiplied in float32 where the forwarder can (`kernels.bf16_matmul`).
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


def quantized_matvec(layer: nn.QuantizedLinear | nn.QuantizedEmbedding, x: mx.array) -> mx.array:
    """`x @ W.T` for a quantized layer's W and an input of one row, split over the CPU lanes
    like `matvec` (MLX's quantized kernel uses one core: 4-bit decode 3.3 -> 5.7 tokens/s)."""

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
    forwarder's bf16 product for bf16 weights kept under float32 compute (`kernels.bf16_matmul`;
    MLX would upcast the whole weight at every call), else MLX's matmul."""
    if x.size == x.shape[-1]:
        return matvec(weight, x)
    if reads_bf16_weights(weight, x.dtype):
        return bf16_matmul(weight, x)
    return x @ weight.T


class Linear(nn.Linear):
    """nn.Linear; without bias, `project` picks the path (one row, bf16 weights kept)."""

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" not in self:
            return project(self.weight, x)
        return super().__call__(x)

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class FusedRows:
    """Float layers that read the same input, their weights stacked in one array.

    A decode step is bound by reading weights, and on MLX's CPU backend each matmul also pays
    a BLAS call's thread hand-off: one matvec over the stacked rows reads the same bytes in one
    call (w1 and w3 of a feed-forward, q/k/v of an attention: 450M float32 decode 2-8% faster).
    Each layer's weight becomes a row range of the stack, a view, so the layers and their
    parameter names stay as they were and nothing is stored twice.
    """

    def __init__(self, *layers: Linear):
        self.stacked = mx.concatenate([layer.weight for layer in layers])
        mx.eval(self.stacked)
        self.splits, start = [], 0
        for layer in layers:
            rows = layer.weight.shape[0]
            layer.weight = self.stacked[start : start + rows]
            start += rows
            self.splits.append(start)
        self.views = [layer.weight for layer in layers]

    @staticmethod
    def of(*layers: nn.Module) -> FusedRows | None:
        """The fusion of `layers`, or None unless all are bias-free float `Linear` layers."""
        if all(type(layer) is Linear and "bias" not in layer for layer in layers):
            return FusedRows(*layers)
        return None

    def is_current(self, *layers: nn.Module) -> bool:
        """Whether `layers` (the owner's layers now) still hold the stack's views: False once
        a layer or its weight has been replaced (quantized, cast, reloaded)."""
        return all(
            layer.get("weight") is view for layer, view in zip(layers, self.views, strict=True)
        )

    def __call__(self, x: mx.array) -> list[mx.array]:
        """Each layer's output for x."""
        return mx.split(project(self.stacked, x), self.splits[:-1], axis=-1)


def plain_matvec_weight(
    layer: nn.Module | FusedRows | None, activations: mx.Dtype
) -> mx.array | None:
    """The weight of a bias-free float layer (or a current stack of them) whose one-row product
    with `activations` is one op (`_times`), else None (quantized, biased, or a dtype that
    `matvec` splits over the CPU lanes)."""
    if isinstance(layer, FusedRows):
        weight = layer.stacked
    elif type(layer) is Linear and "bias" not in layer:
        weight = layer.weight
    else:
        return None
    if weight.dtype == mx.float32 or not on_cpu():
        return weight
    return weight if reads_bf16_weights(weight, activations) else None


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear; a one-row input is split over the CPU lanes (`quantized_matvec`)."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.size != x.shape[-1]:
            return super().__call__(x)
        out = quantized_matvec(self, x)
        return out + self["bias"] if "bias" in self else out


class Attention(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        head_dim = args.head_dim
        self.scale = head_dim**-0.5
        dim = args.hidden_size
        self.q_proj = Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.out_proj = Linear(self.n_heads * head_dim, dim, bias=False)
        # Per-head RMSNorm on queries and keys, before RoPE.
        self.q_layernorm = nn.RMSNorm(head_dim, eps=args.norm_eps)
        self.k_layernorm = nn.RMSNorm(head_dim, eps=args.norm_eps)
        # The reference rotates halves (rotate_half), which is MLX's non-traditional RoPE.
        self.rope = nn.RoPE(head_dim, traditional=False, base=args.rope_theta)
        self._qkv: FusedRows | None = None  # set by `fuse_projections`; private: no parameter

    def fuse_projections(self) -> None:
        self._qkv = FusedRows.of(self.q_proj, self.k_proj, self.v_proj)

    def _current_qkv(self) -> FusedRows | None:
        if self._qkv is not None and not self._qkv.is_current(
            self.q_proj, self.k_proj, self.v_proj
        ):
            self._qkv = None  # weights replaced since the fusion: run unfused, free the stack
        return self._qkv

    def one_token_weights(self, activations: mx.Dtype) -> tuple[mx.array, mx.array] | None:
        """The stacked q/k/v and the output weight for `decode_step`, or None (see
        `plain_matvec_weight`)."""
        qkv = plain_matvec_weight(self._current_qkv(), activations)
        weights = (qkv, plain_matvec_weight(self.out_proj, activations))
        return None if any(w is None for w in weights) else weights

    def __call__(self, x: mx.array, causal: bool, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self._current_qkv() is not None:
            q, k, v = self._qkv(x)
        else:
            q, k, v = (projection(x) for projection in projections)
        queries = self.q_layernorm(q.reshape(B, L, self.n_heads, -1))
        keys = self.k_layernorm(k.reshape(B, L, self.n_kv_heads, -1))
        values = v.reshape(B, L, self.n_kv_heads, -1)
        queries = queries.transpose(0, 2, 1, 3)
        keys = keys.transpose(0, 2, 1, 3)
        values = values.transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)

        out = attention(queries, keys, values, self.scale, causal)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class ShortConv(nn.Module):
    """Gated depthwise causal conv: out_proj(C * conv(B * x)), with B, C, x from one projection."""

    def __init__(self, args: TextConfig):
        super().__init__()
        dim = args.hidden_size
        self.kernel_size = args.conv_L_cache
        # MLX layout (D, K, 1); the loader transposes the reference's (D, 1, K).
        self.conv = nn.Conv1d(dim, dim, self.kernel_size, groups=dim, bias=args.conv_bias)
        self.in_proj = Linear(dim, 3 * dim, bias=args.conv_bias)
        self.out_proj = Linear(dim, dim, bias=args.conv_bias)

    def one_token_weights(
        self, activations: mx.Dtype
    ) -> tuple[mx.array, mx.array, mx.array] | None:
        """in_proj, the conv weight (D, K, 1) and out_proj for `decode_step`, or None (a bias,
        or see `plain_matvec_weight`)."""
        in_proj = plain_matvec_weight(self.in_proj, activations)
        out_proj = plain_matvec_weight(self.out_proj, activations)
        if "bias" in self.conv or in_proj is None or out_proj is None:
            return None
        return in_proj, self.conv.weight, out_proj

    def __call__(self, x: mx.array, cache: ConvCache | None = None) -> mx.array:
        B, L, D = x.shape
        gate_in, gate_out, h = mx.split(self.in_proj(x), 3, axis=-1)
        h = gate_in * h

        # A K-tap depthwise conv over [state, h] is K shifted multiply-adds: cheaper than a
        # general conv call, and the same code serves prefill and one-token decode.
        K = self.kernel_size
        state = cache.conv_state if cache is not None else None
        if state is None:
            state = mx.zeros((B, K - 1, D), h.dtype)
        padded = mx.concatenate([state, h], axis=1)
        if cache is not None:
            cache.conv_state = padded[:, L:, :]
            cache.offset += L
        taps = self.conv.weight[:, :, 0]  # (D, K)
        conv = padded[:, 0:L, :] * taps[:, 0]
        for k in range(1, K):
            conv = conv + padded[:, k : k + L, :] * taps[:, k]
        if "bias" in self.conv:
            conv = conv + self.conv.bias
        return self.out_proj(gate_out * conv)


class FeedForward(nn.Module):
    """SwiGLU MLP; its width follows the reference's `block_auto_adjust_ff_dim` rule."""

    def __init__(self, args: TextConfig):
        super().__init__()
        self.w1 = Linear(args.hidden_size, args.ff_dim, bias=False)
        self.w3 = Linear(args.hidden_size, args.ff_dim, bias=False)
        self.w2 = Linear(args.ff_dim, args.hidden_size, bias=False)
        self._w13: FusedRows | None = None  # set by `fuse_projections`

    def fuse_projections(self) -> None:
        self._w13 = FusedRows.of(self.w1, self.w3)

    def _current_w13(self) -> FusedRows | None:
        if self._w13 is not None and not self._w13.is_current(self.w1, self.w3):
            self._w13 = None  # weights replaced since the fusion: run unfused, free the stack
        return self._w13

    def one_token_weights(self, activations: mx.Dtype) -> tuple[mx.array, mx.array] | None:
        """The stacked w1/w3 and w2 for `decode_step`, or None (see `plain_matvec_weight`)."""
        w13 = plain_matvec_weight(self._current_w13(), activations)
        weights = (w13, plain_matvec_weight(self.w2, activations))
        return None if any(w is None for w in weights) else weights

    def __call__(self, x: mx.array) -> mx.array:
        w13 = self._current_w13()

        def rows(x: mx.array) -> mx.array:
            gate, up = w13(x) if w13 is not None else (self.w1(x), self.w3(x))
            return self.w2(swiglu(gate, up))

        return in_row_blocks(rows, x, 2 * self.w1.weight.shape[0])


# One-token decode. Between its weight reads a decode step is many small ops (norms, gates, the
# conv taps, RoPE), and on MLX's CPU backend each op costs a few microseconds to build and to
# dispatch whatever its size: ~1750 graph nodes for the 450M model, 11-12 ms of a 56 ms float32
# step. Compiled, each layer is one call with its weights passed in, and its element-wise ops
# run as a few fused loops (~800 nodes in all). The hidden state is a row (1, D) throughout: a
# (1, 1, D) input would add a flatten and an unflatten around every matmul. Shapes are fixed
# for one token, so each function is traced once per model; the attention over the growing
# cache stays outside.


def _times(x, weight):
    """x (1, K) @ weight.T: from bf16 weights in float32 where the forwarder can (`matvec`)."""
    return bf16_matmul(weight, x) if reads_bf16_weights(weight, x.dtype) else x @ weight.T


def _feed_forward_step(h, ffn_norm, w13, w2, eps):
    gate, up = mx.split(_times(mx.fast.rms_norm(h, ffn_norm, eps), w13), 2, axis=-1)
    return h + _times(swiglu(gate, up), w2)


@mx.compile
def _conv_layer_step(x, state, operator_norm, in_proj, conv, out_proj, ffn_norm, w13, w2, eps):
    """A short-conv layer on one token: x (1, D), state (1, K-1, D), conv weight (D, K, 1) ->
    the output (1, D) and the next state."""
    D, K = x.shape[1], conv.shape[1]
    gate_in, gate_out, h = mx.split(_times(mx.fast.rms_norm(x, operator_norm, eps), in_proj), 3, -1)
    padded = mx.concatenate([state.reshape(K - 1, D), gate_in * h])  # (K, D)
    taps = conv.reshape(D, K).T
    mixed = padded[:1] * taps[:1]
    for k in range(1, K):  # the same additions, in the same order, as prefill
        mixed = mixed + padded[k : k + 1] * taps[k : k + 1]
    h = x + _times(gate_out * mixed, out_proj)
    return _feed_forward_step(h, ffn_norm, w13, w2, eps), padded[1:].reshape(1, K - 1, D)


def _rotate(x, cos, sin):
    """RoPE with rotated halves (MLX's non-traditional, the reference's rotate_half) from given
    angles: `mx.fast.rope` on the CPU derives the angles again at every call, ~10 graph nodes
    per call, 12 calls a step."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@mx.compile
def _attention_layer_qkv(x, cos, sin, operator_norm, qkv, q_norm, k_norm, eps, heads):
    """Rotated queries (1, Hq, 1, d), keys and values (1, Hkv, 1, d) of one token x (1, D);
    `cos`, `sin` (d / 2,) are its angles (`rope_angles`), `heads` is (Hq, Hkv)."""
    (n_heads, n_kv_heads), head_dim = heads, q_norm.shape[0]
    q_end, k_end = n_heads * head_dim, (n_heads + n_kv_heads) * head_dim
    q, k, v = mx.split(_times(mx.fast.rms_norm(x, operator_norm, eps), qkv), [q_end, k_end], -1)
    q = mx.fast.rms_norm(q.reshape(1, n_heads, 1, head_dim), q_norm, eps)
    k = mx.fast.rms_norm(k.reshape(1, n_kv_heads, 1, head_dim), k_norm, eps)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v.reshape(1, n_kv_heads, 1, head_dim)


@mx.compile
def _attention_layer_out(x, attended, out_proj, ffn_norm, w13, w2, eps):
    """The rest of an attention layer on one token: x (1, D), attended (1, Hq, 1, d)."""
    h = x + _times(attended.reshape(1, -1), out_proj)  # one query: (1, Hq, 1, d) is row-ordered
    return _feed_forward_step(h, ffn_norm, w13, w2, eps)


@lru_cache(maxsize=1)  # the attention layers of a step all ask for the same position
def rope_angles(position: int, dims: int, base: float) -> tuple[mx.array, mx.array]:
    """cos and sin (dims / 2,) of the RoPE angles at `position`, computed on the host in float32
    the way the reference computes them (its inverse frequencies, one float32 product)."""
    exponents = np.arange(0, dims, 2, dtype=np.float32) / np.float32(dims)
    inv_freq = (1.0 / np.power(np.float32(base), exponents)).astype(np.float32)
    angles = inv_freq * np.float32(position)
    return mx.array(np.cos(angles)), mx.array(np.sin(angles))


class DecoderLayer(nn.Module):
    def __init__(self, args: TextConfig, layer_id: int):
        super().__init__()
        self.is_attention_layer = args.layer_types[layer_id] != "conv"
        if self.is_attention_layer:
            self.self_attn = Attention(args)
        else:
            self.conv = ShortConv(args)
        self.feed_forward = FeedForward(args)
        self.operator_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)

    def __call__(self, x: mx.array, causal: bool, cache=None) -> mx.array:
        if self.is_attention_layer:
            h = x + self.self_attn(self.operator_norm(x), causal, cache)
        else:
            h = x + self.conv(self.operator_norm(x), cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def decode_step(self, x: mx.array, cache: KVCache | ConvCache) -> mx.array | None:
        """The layer on one token x (1, D) with its compiled step function, updating `cache`;
        None when a projection is not a plain matvec (quantized, biased, unfused)."""
        ffn = self.feed_forward.one_token_weights(x.dtype)
        mixer = self.self_attn if self.is_attention_layer else self.conv
        own = mixer.one_token_weights(x.dtype)
        if ffn is None or own is None:
            return None
        eps = self.operator_norm.eps
        norms = (self.operator_norm.weight, self.ffn_norm.weight)
        if not self.is_attention_layer:
            in_proj, conv, out_proj = own
            state = cache.conv_state
            if state is None:
                state = mx.zeros((1, conv.shape[1] - 1, x.shape[-1]), x.dtype)
            out, cache.conv_state = _conv_layer_step(
                x, state, norms[0], in_proj, conv, out_proj, norms[1], *ffn, eps
            )
            cache.offset += 1
            return out
        attn, (qkv, out_proj) = self.self_attn, own
        # `Attention` builds its RoPE over the whole head, with rotated halves: `_rotate`.
        cos, sin = rope_angles(cache.offset, attn.rope.dims, attn.rope.base)
        q, k, v = _attention_layer_qkv(
            x,
            cos.astype(x.dtype),
            sin.astype(x.dtype),
            norms[0],
            qkv,
            attn.q_layernorm.weight,
            attn.k_layernorm.weight,
            eps,
            (attn.n_heads, attn.n_kv_heads),
        )
        keys, values = cache.update_and_fetch(k, v)
        attended = attention(q, keys, values, attn.scale)
        return _attention_layer_out(x, attended, out_proj, norms[1], *ffn, eps)


class Lfm2Model(nn.Module):
    """Embeddings, decoder layers and the final norm; the LM head lives with the caller."""

    def __init__(self, args: TextConfig):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.embedding_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)

    def __call__(self, inputs_embeds: mx.array, cache: list | None = None) -> mx.array:
        L = inputs_embeds.shape[1]
        # The causal mask aligns the last query with the last key, so it also covers a chunk
        # appended to a cache; one query needs no mask at all.
        causal = L > 1
        if cache is not None and inputs_embeds.shape[:2] == (1, 1):
            return self._one_token(inputs_embeds, cache)
        cache = cache if cache is not None else [None] * len(self.layers)
        h = inputs_embeds
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, causal, layer_cache)
        return self.embedding_norm(h)

    def _one_token(self, x: mx.array, cache: list) -> mx.array:
        """One token (1, 1, D) through the layers as a row (1, D), each with its compiled step
        (`DecoderLayer.decode_step`); a layer that declines runs the general way."""
        h = x.reshape(1, -1)
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            out = layer.decode_step(h, layer_cache)
            h = out if out is not None else layer(h[None], False, layer_cache)[0]
        return self.embedding_norm(h)[None]

    def make_cache(self) -> list[KVCache | ConvCache]:
        return [KVCache() if layer.is_attention_layer else ConvCache() for layer in self.layers]

    def fuse_projections(self) -> None:
        """Stack the weights of projections that share an input (`FusedRows`); for inference,
        after the weights are loaded. Layers quantized later simply run unfused."""
        for layer in self.layers:
            if layer.is_attention_layer:
                layer.self_attn.fuse_projections()
            layer.feed_forward.fuse_projections()
