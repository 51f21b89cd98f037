"""The whole LFM2-VL model: vision tower, projector, LFM2 backbone and the (tied) LM head.

Inputs are the port's packed, unpadded layout: `pixel_values` (total_patches, patch_dim) holds
every view's patches one view after another, and `spatial_shapes` (views, 2) gives each view's
patch grid. Image features replace the `<image>` token embeddings in order, one row per token.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import ConvCache, KVCache
from ..config import ModelConfig
from ..errors import Lfm2VlError
from .lfm2 import Lfm2Model
from .projector import MultiModalProjector
from .siglip2 import VisionModel


class Lfm2VlModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionModel(config.vision)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = Lfm2Model(config.text)
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def get_image_features(self, pixel_values: mx.array, spatial_shapes) -> mx.array:
        """Packed patches of all views -> image embeddings (tokens, text hidden), in view order.

        Views that share a patch grid (the tiles of an image) run through the encoder and the
        projector as one batch; each distinct grid (a thumbnail, a small single image) runs at its
        own size.
        """
        shapes = [tuple(int(v) for v in s) for s in np.asarray(spatial_shapes).reshape(-1, 2)]
        sizes = [h * w for h, w in shapes]
        if sum(sizes) != pixel_values.shape[0]:
            raise Lfm2VlError(
                f"pixel_values has {pixel_values.shape[0]} patches but spatial_shapes describe "
                f"{sum(sizes)}: pass the arrays from one processor call together"
            )
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for view, shape in enumerate(shapes):
            by_shape.setdefault(shape, []).append(view)

        # The compute dtype of the tower: a LayerNorm's, since a quantized layer's weight dtype
        # is its packed integer type.
        dtype = self.vision_tower.post_layernorm.weight.dtype
        pixel_values = pixel_values.astype(dtype)
        per_view: list[mx.array | None] = [None] * len(shapes)
        for (h, w), views in by_shape.items():
            patches = mx.stack([pixel_values[starts[v] : starts[v] + h * w] for v in views])
            features = self.vision_tower(patches, h, w)
            embeddings = self.multi_modal_projector(features.reshape(len(views), h, w, -1))
            for i, v in enumerate(views):
                per_view[v] = embeddings[i]
        return mx.concatenate(per_view, axis=0)

    def get_input_embeddings(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        spatial_shapes=None,
        image_features: mx.array | None = None,
    ) -> mx.array:
        """Token embeddings with image features in the `<image>` slots, shape (1, L, D).

        The features come from `pixel_values` and `spatial_shapes`, or ready-made
        (`image_features`, from `get_image_features`: several requests' views encoded at once).
        """
        embeddings = self.language_model.embed_tokens(input_ids)
        if pixel_values is None and image_features is None:
            return embeddings
        if input_ids.shape[0] != 1:
            raise Lfm2VlError("prompts with images run one at a time (batch size 1)")
        features = image_features
        if features is None:
            features = self.get_image_features(pixel_values, spatial_shapes)
        ids = np.asarray(input_ids[0])
        slots = np.flatnonzero(ids == self.config.image_token_id)
        if len(slots) != features.shape[0]:
            raise Lfm2VlError(
                f"the prompt has {len(slots)} image tokens but the images give {features.shape[0]} "
                "features: build input_ids and pixel_values with the same processor call"
            )
        # One row gather: text positions read their own embedding, image slots read the next
        # feature row from the rows appended after the L text rows.
        L = ids.shape[0]
        source = np.arange(L)
        source[slots] = L + np.arange(len(slots))
        rows = mx.concatenate([embeddings[0], features.astype(embeddings.dtype)], axis=0)
        return rows[mx.array(source)][None]

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        spatial_shapes=None,
        cache: list[KVCache | ConvCache] | None = None,
        inputs_embeds: mx.array | None = None,
    ) -> mx.array:
        """Logits (1, L, vocab) for every position; with `cache`, continues from its state."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings(input_ids, pixel_values, spatial_shapes)
        hidden = self.language_model(inputs_embeds, cache)
        return self.lm_head_logits(hidden)

    def lm_head_logits(self, hidden: mx.array) -> mx.array:
        if "lm_head" in self:
            return self.lm_head(hidden)
        return self.language_model.embed_tokens.as_linear(hidden)  # the tied head

    def make_cache(self) -> list[KVCache | ConvCache]:
        return self.language_model.make_cache()
