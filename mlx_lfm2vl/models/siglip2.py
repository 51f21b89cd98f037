"""SigLIP2 NaFlex vision encoder for variable-size views, without padding.

Each view (a 512x512 tile, a thumbnail, or one resized image) has its own patch grid h x w. The
learned position grid (16x16 for the published checkpoints) is resized to h x w exactly as the
reference does (`F.interpolate(..., mode="bilinear", antialias=True, align_corners=False)`), here
as one precomputed (h*w, 256) matrix per grid. Views of equal shape run as one batch; no view is
padded, so no attention mask is needed and no work is spent on padding.

Parameter names follow the reference (`model.vision_tower.*`): `embeddings.patch_embedding`,
`embeddings.position_embedding`, `encoder.layers.N.{layer_norm1,self_attn,layer_norm2,mlp}`,
`post_layernorm`.

MLX's own math on every device; `Attention.attend` and `MLP.activation` are seams a backend may
replace on a loaded model (the CPU backend in `mlx_lfm2vl/cpu/` does).
"""

from __future__ import annotations

import math
from functools import lru_cache, partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import VisionConfig


def _antialiased_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) weights of torch's antialiased bilinear resize, align_corners=False.

    Follows ATen's `_upsample_bilinear2d_aa` weight computation: a triangle filter whose support
    widens by the scale factor when downscaling, with the weights of each output normalised.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((taps - center + 0.5) * inv_scale))
        total = w.sum()
        weights[i, lo:hi] = w / total if total != 0 else w
    return weights


@lru_cache(maxsize=64)
def position_resize_matrix(grid: int, height: int, width: int) -> mx.array:
    """(height*width, grid*grid) matrix mapping the learned grid to a view's patch grid."""
    rows = _antialiased_bilinear_weights(grid, height)
    cols = _antialiased_bilinear_weights(grid, width)
    return mx.array(np.kron(rows, cols).astype(np.float32))


_GELU_2C = 2.0 * math.sqrt(2.0 / math.pi)


@partial(mx.compile, shapeless=True)  # one fused loop instead of seven element-wise ops
def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation (torch's `gelu_pytorch_tanh`), written with a sigmoid.

    0.5 * (1 + tanh(z)) == sigmoid(2z): the same function, one transcendental instead of the
    tanh's two exps.
    """
    return x * mx.sigmoid(_GELU_2C * (x + 0.044715 * x * x * x))


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        patch_dim = config.num_channels * config.patch_size * config.patch_size
        self.patch_embedding = nn.Linear(patch_dim, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)
        self.grid = int(config.num_patches**0.5)

    def __call__(self, patches: mx.array, height: int, width: int) -> mx.array:
        """patches (N, height*width, patch_dim) of N views sharing one grid -> (N, h*w, D)."""
        resize = position_resize_matrix(self.grid, height, width)
        # The reference resizes in float32 and casts back to the weights' dtype.
        table = self.position_embedding.weight.astype(mx.float32)
        positions = (resize @ table).astype(self.position_embedding.weight.dtype)
        return self.patch_embedding(patches) + positions


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (dim // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (
            proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = self.attend(q, k, v)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """Every patch of a view attends to every other: no mask, no padding."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"unsupported vision activation {config.hidden_act!r}")
        self.activation = gelu_tanh if config.hidden_act == "gelu_pytorch_tanh" else nn.gelu
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, patches: mx.array, height: int, width: int) -> mx.array:
        """patches (N, height*width, patch_dim) of N same-shape views -> features (N, h*w, D)."""
        x = self.embeddings(patches, height, width)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)
