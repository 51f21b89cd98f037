"""The multimodal projector: pixel unshuffle, optional LayerNorm, 2-layer GELU MLP.

Parameter names follow the reference (`model.multi_modal_projector.*`): `layer_norm`, `linear_1`,
`linear_2`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig


def pixel_unshuffle(x: mx.array, factor: int) -> mx.array:
    """(N, h, w, C) -> (N, h/f, w/f, f*f*C), channels ordered (row offset, column offset, C).

    The channel order is the one the reference's two reshape/permute rounds produce; the
    projector's first weight matrix depends on it.
    """
    N, h, w, C = x.shape
    x = x.reshape(N, h // factor, factor, w // factor, factor, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(N, h // factor, w // factor, factor * factor * C)


class MultiModalProjector(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.factor = config.downsample_factor
        in_dim = config.vision.hidden_size * self.factor**2
        if config.projector_use_layernorm:
            # torch.nn.LayerNorm's default eps; the reference sets no other.
            self.layer_norm = nn.LayerNorm(in_dim, eps=1e-5)
        self.linear_1 = nn.Linear(in_dim, config.projector_hidden_size, bias=config.projector_bias)
        self.linear_2 = nn.Linear(
            config.projector_hidden_size, config.text.hidden_size, bias=config.projector_bias
        )

    def __call__(self, features: mx.array) -> mx.array:
        """Vision features (N, h, w, C) -> image embeddings (N, h/f * w/f, text hidden)."""
        x = pixel_unshuffle(features, self.factor)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if "layer_norm" in self:
            x = self.layer_norm(x)
        return self.linear_2(nn.gelu(self.linear_1(x)))
