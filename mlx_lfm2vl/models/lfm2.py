"""The LFM2 hybrid language backbone: gated short-conv blocks and GQA attention blocks.

Module and parameter names follow the reference checkpoints (`model.language_model.*`), so
weights load without renaming: `layers.N.conv.{in_proj,conv,out_proj}`,
`layers.N.self_attn.{q,k,v,out}_proj`, `layers.N.self_attn.{q,k}_layernorm`,
`layers.N.feed_forward.w{1,2,3}`, `operator_norm`, `ffn_norm`, `embed_tokens`, `embedding_norm`
(the final norm, despite its name).

This is MLX's own math on every device. A few methods are seams a backend may replace on a loaded
model (the CPU backend in `mlx_lfm2vl/cpu/` does): `Attention.attend`, `Attention.qkv`,
`FeedForward.gate_up` and `FeedForward.activation`.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..cache import ConvCache, KVCache
from ..config import TextConfig


@partial(mx.compile, shapeless=True)  # one fused loop instead of four element-wise ops
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class Attention(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        head_dim = args.head_dim
        self.scale = head_dim**-0.5
        dim = args.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        # Per-head RMSNorm on queries and keys, before RoPE.
        self.q_layernorm = nn.RMSNorm(head_dim, eps=args.norm_eps)
        self.k_layernorm = nn.RMSNorm(head_dim, eps=args.norm_eps)
        # The reference rotates halves (rotate_half), which is MLX's non-traditional RoPE.
        self.rope = nn.RoPE(head_dim, traditional=False, base=args.rope_theta)

    def qkv(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """The three projections of x."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def queries_keys_values(
        self, x: mx.array, offset: int | mx.array
    ) -> tuple[mx.array, mx.array, mx.array]:
        """x (B, L, D) at positions offset.. -> normed, rotated queries (B, Hq, L, d), keys and
        values (B, Hkv, L, d)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x)
        queries = self.q_layernorm(q.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        keys = self.k_layernorm(k.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        values = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return self.rope(queries, offset=offset), self.rope(keys, offset=offset), values

    def attend(
        self, q: mx.array, k: mx.array, v: mx.array, mask: str | mx.array | None
    ) -> mx.array:
        """Scaled dot-product attention (B, Hq, L, d); a "causal" mask aligns the last query
        with the last key, so it also covers a chunk of prompt appended to a cache; an array
        mask (B, 1, L, S) says which keys each query sees."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)

    def output(self, attended: mx.array) -> mx.array:
        B, _, L, _ = attended.shape
        return self.out_proj(attended.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def __call__(
        self, x: mx.array, mask: str | mx.array | None = None, cache: KVCache | None = None
    ) -> mx.array:
        # A cache of several rows gives each row's own position (B,) (`BatchKVCache.offset`).
        queries, keys, values = self.queries_keys_values(x, cache.offset if cache else 0)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        return self.output(self.attend(queries, keys, values, mask))


class ShortConv(nn.Module):
    """Gated depthwise causal conv: out_proj(C * conv(B * x)), with B, C, x from one projection."""

    def __init__(self, args: TextConfig):
        super().__init__()
        dim = args.hidden_size
        self.kernel_size = args.conv_L_cache
        # MLX layout (D, K, 1); the loader transposes the reference's (D, 1, K).
        self.conv = nn.Conv1d(dim, dim, self.kernel_size, groups=dim, bias=args.conv_bias)
        self.in_proj = nn.Linear(dim, 3 * dim, bias=args.conv_bias)
        self.out_proj = nn.Linear(dim, dim, bias=args.conv_bias)

    def __call__(self, x: mx.array, cache: ConvCache | None = None) -> mx.array:
        B, L, D = x.shape
        gate_in, gate_out, h = mx.split(self.in_proj(x), 3, axis=-1)
        h = gate_in * h

        # The state is the last K - 1 conv inputs. A K-tap depthwise conv over [state, h] is K
        # shifted multiply-adds: the same code for a prompt and for one token.
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
        self.w1 = nn.Linear(args.hidden_size, args.ff_dim, bias=False)
        self.w3 = nn.Linear(args.hidden_size, args.ff_dim, bias=False)
        self.w2 = nn.Linear(args.ff_dim, args.hidden_size, bias=False)
        self.activation = swiglu

    def gate_up(self, x: mx.array) -> tuple[mx.array, mx.array]:
        return self.w1(x), self.w3(x)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(self.activation(*self.gate_up(x)))


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

    def __call__(self, x: mx.array, mask: str | mx.array | None = None, cache=None) -> mx.array:
        if self.is_attention_layer:
            mixed = self.self_attn(self.operator_norm(x), mask, cache)
        else:
            mixed = self.conv(self.operator_norm(x), cache)
        return self.feed_forward_block(x + mixed)

    def feed_forward_block(self, h: mx.array) -> mx.array:
        """The layer's second half: the feed-forward on the normed input, plus its residual."""
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
        # One query needs no mask; "causal" also covers a chunk appended to a cache. A cache of
        # several rows of different lengths masks each row's padding (`BatchKVCache`).
        mask = "causal" if L > 1 else None
        cache = cache if cache is not None else [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            if layer.is_attention_layer and layer_cache is not None:
                mask = layer_cache.make_mask(L)
                break
        h = inputs_embeds
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, mask, layer_cache)
        return self.embedding_norm(h)

    def make_cache(self) -> list[KVCache | ConvCache]:
        return [KVCache() if layer.is_attention_layer else ConvCache() for layer in self.layers]
