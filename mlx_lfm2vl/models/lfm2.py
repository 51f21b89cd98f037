"""The LFM2 hybrid language backbone: gated short-conv blocks and GQA attention blocks.

Module and parameter names follow the reference checkpoints (`model.language_model.*`), so
weights load without renaming: `layers.N.conv.{in_proj,conv,out_proj}`,
`layers.N.self_attn.{q,k,v,out}_proj`, `layers.N.self_attn.{q,k}_layernorm`,
`layers.N.feed_forward.w{1,2,3}`, `operator_norm`, `ffn_norm`, `embed_tokens`, `embedding_norm`
(the final norm, despite its name).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cache import ConvCache, KVCache
from ..config import TextConfig
from .kernels import attention, in_row_blocks, split_rows, swiglu


def matvec(weight: mx.array, x: mx.array) -> mx.array:
    """`x @ weight.T` for an input of one row (a decode step), as a matrix-vector product.

    On MLX's CPU backend a one-row matmul runs as a general matmul, up to 4x slower than
    `weight @ vector` (the results are bitwise equal). In float32 that is a BLAS call, which
    uses every core; in other dtypes MLX's own kernel uses one, so the weight's rows are split
    over the CPU lanes (`kernels.split_rows`: bf16 decode 3.3 -> 5.3 tokens/s at the 450M
    shapes; splitting float32 gained nothing).
    """
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


class Linear(nn.Linear):
    """nn.Linear; a one-row input without bias takes the matrix-vector path (see `matvec`)."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.size == x.shape[-1] and "bias" not in self:
            return matvec(self.weight, x)
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
        if x.size == x.shape[-1]:
            out = matvec(self.stacked, x)
        else:
            out = x @ self.stacked.T
        return mx.split(out, self.splits[:-1], axis=-1)


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

    def __call__(self, x: mx.array, causal: bool, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self._qkv is not None and not self._qkv.is_current(*projections):
            self._qkv = None  # weights replaced since the fusion: run unfused, free the stack
        if self._qkv is not None:
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

    def __call__(self, x: mx.array) -> mx.array:
        if self._w13 is not None and not self._w13.is_current(self.w1, self.w3):
            self._w13 = None  # weights replaced since the fusion: run unfused, free the stack

        def rows(x: mx.array) -> mx.array:
            gate, up = self._w13(x) if self._w13 is not None else (self.w1(x), self.w3(x))
            return self.w2(swiglu(gate, up))

        return in_row_blocks(rows, x, 2 * self.w1.weight.shape[0])


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
        cache = cache if cache is not None else [None] * len(self.layers)
        h = inputs_embeds
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, causal, layer_cache)
        return self.embedding_norm(h)

    def make_cache(self) -> list[KVCache | ConvCache]:
        return [KVCache() if layer.is_attention_layer else ConvCache() for layer in self.layers]

    def fuse_projections(self) -> None:
        """Stack the weights of projections that share an input (`FusedRows`); for inference,
        after the weights are loaded. Layers quantized later simply run unfused."""
        for layer in self.layers:
            if layer.is_attention_layer:
                layer.self_attn.fuse_projections()
            layer.feed_forward.fuse_projections()
