"""Model configuration read from a checkpoint's config.json.

The published LFM2-VL repositories went through several revisions, and each spelled some fields
differently. This module is the one place that knows every spelling; the model code sees only the
dataclasses below.

| meaning             | spellings accepted, in the reference's order of precedence          |
|---------------------|---------------------------------------------------------------------|
| model type          | `lfm2_vl` (native transformers), `lfm2-vl` (Aug-2025 remote code)   |
| image token id      | `image_token_id`, `image_token_index`                               |
| text width          | `hidden_size`, else `block_dim`                                     |
| FFN width (before   | `block_ff_dim` (wins: `Lfm2Config` pops it over the other),         |
|   the auto-adjust)  | `intermediate_size`                                                 |
| RoPE base           | `rope_parameters.rope_theta`, `rope_theta`, else 1e6 (no `theta`)   |
| attention layers    | `layer_types`, else `full_attn_idxs`, else every layer              |
| tied LM head        | top level `tie_embedding` (wins), `tie_word_embeddings`             |
| RMSNorm eps         | `norm_eps` (`block_norm_eps` is ignored)                            |

Where a spelling is ignored, it is because the reference ignores it: parity beats guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import Lfm2VlError

MODEL_TYPES = ("lfm2_vl", "lfm2-vl")


def _first(source: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if source.get(key) is not None:
            return source[key]
    return default


@dataclass(frozen=True)
class TextConfig:
    """The LFM2 hybrid backbone (short-conv blocks + GQA attention blocks)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    layer_types: tuple[str, ...]
    conv_L_cache: int = 3
    conv_bias: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 128_000
    block_auto_adjust_ff_dim: bool = True
    block_ffn_dim_multiplier: float | None = 1.0
    block_multiple_of: int = 256
    tie_word_embeddings: bool = True
    eos_token_id: int | list[int] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ff_dim(self) -> int:
        """The FFN width the reference actually builds (`Lfm2MLP`'s auto-adjust rule)."""
        width = self.intermediate_size
        if self.block_auto_adjust_ff_dim:
            width = int(2 * width / 3)
            if self.block_ffn_dim_multiplier is not None:
                width = int(self.block_ffn_dim_multiplier * width)
                multiple = self.block_multiple_of
                width = multiple * ((width + multiple - 1) // multiple)
        return width

    @property
    def attention_layer_ids(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind != "conv"]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        hidden_size = _first(d, "hidden_size", "block_dim")
        num_layers = _first(d, "num_hidden_layers", "num_layers")
        if hidden_size is None or num_layers is None:
            raise Lfm2VlError("text_config lacks hidden_size/num_hidden_layers: not an LFM2 config")
        layer_types = d.get("layer_types")
        if layer_types is None:
            # Old LFM2 configs list the attention layers instead; with neither, the reference makes
            # every layer an attention layer.
            attention_ids = _first(d, "full_attn_idxs", default=list(range(num_layers)))
            layer_types = [
                "full_attention" if i in attention_ids else "conv" for i in range(num_layers)
            ]
        rope = d.get("rope_parameters") or {}
        return cls(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=d.get("num_attention_heads", 32),
            num_key_value_heads=d.get("num_key_value_heads", 8),
            intermediate_size=_first(d, "block_ff_dim", "intermediate_size", default=12288),
            vocab_size=d.get("vocab_size", 65536),
            layer_types=tuple(layer_types),
            conv_L_cache=d.get("conv_L_cache", 3),
            conv_bias=d.get("conv_bias", False),
            norm_eps=d.get("norm_eps", 1e-5),
            rope_theta=float(_first(rope, "rope_theta") or d.get("rope_theta") or 1e6),
            max_position_embeddings=d.get("max_position_embeddings", 128_000),
            block_auto_adjust_ff_dim=d.get("block_auto_adjust_ff_dim", True),
            block_ffn_dim_multiplier=d.get("block_ffn_dim_multiplier", 1.0),
            block_multiple_of=d.get("block_multiple_of", 256),
            tie_word_embeddings=_first(d, "tie_embedding", "tie_word_embeddings", default=True),
            eos_token_id=d.get("eos_token_id"),
        )


@dataclass(frozen=True)
class VisionConfig:
    """The SigLIP2 NaFlex vision encoder."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int = 3
    patch_size: int = 16
    num_patches: int = 256
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        model_type = d.get("model_type", "siglip2_vision_model")
        if model_type != "siglip2_vision_model":
            raise Lfm2VlError(
                f"vision_config.model_type is {model_type!r}; this port supports SigLIP2 NaFlex "
                "('siglip2_vision_model') only"
            )
        return cls(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_channels=d.get("num_channels", 3),
            patch_size=d.get("patch_size", 16),
            num_patches=d.get("num_patches", 256),
            layer_norm_eps=d.get("layer_norm_eps", 1e-6),
            hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
        )


@dataclass(frozen=True)
class ModelConfig:
    """The whole LFM2-VL model: vision tower, projector, backbone."""

    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 396
    downsample_factor: int = 2
    projector_hidden_size: int = 2560
    projector_bias: bool = True
    projector_hidden_act: str = "gelu"
    projector_use_layernorm: bool = True
    # The `quantization` section that the converter writes, read back by `load()`.
    quantization: dict[str, Any] | None = None
    raw: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise Lfm2VlError(
                f"model_type {model_type!r} is not an LFM2-VL model (expected 'lfm2_vl'); "
                "pass the folder of an LFM2-VL or LFM2.5-VL checkpoint"
            )
        if "text_config" not in d or "vision_config" not in d:
            raise Lfm2VlError(
                "config.json lacks text_config or vision_config: the file is incomplete"
            )
        hidden_act = d.get("projector_hidden_act", "gelu")
        if hidden_act != "gelu":
            raise Lfm2VlError(
                f"projector_hidden_act {hidden_act!r} is not supported: this port's projector "
                "implements 'gelu' only, as every published LFM2-VL checkpoint uses"
            )
        # The Aug-2025 configs say `vision_feature_layer: -1` (features from the last encoder
        # layer), which is all the native reference does; other values were never published.
        if d.get("vision_feature_layer", -1) != -1:
            raise Lfm2VlError(
                f"vision_feature_layer {d['vision_feature_layer']} is not supported (only -1)"
            )
        # Whether the LM head shares the embedding matrix is the top-level model's setting in the
        # reference (`Lfm2VlConfig.tie_word_embeddings`), not the text config's.
        text = replace(
            TextConfig.from_dict(d["text_config"]),
            tie_word_embeddings=_first(d, "tie_embedding", "tie_word_embeddings", default=True),
        )
        return cls(
            text=text,
            vision=VisionConfig.from_dict(d["vision_config"]),
            image_token_id=_first(d, "image_token_id", "image_token_index", default=396),
            downsample_factor=d.get("downsample_factor", 2),
            projector_hidden_size=d.get("projector_hidden_size", 2560),
            projector_bias=d.get("projector_bias", True),
            projector_hidden_act=hidden_act,
            projector_use_layernorm=d.get("projector_use_layernorm", True),
            quantization=d.get("quantization"),
            raw=d,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise Lfm2VlError(
                f"{path} not found: pass a checkpoint folder with config.json"
            ) from None
        except json.JSONDecodeError as e:
            raise Lfm2VlError(
                f"{path} is not valid JSON ({e}); re-download the checkpoint"
            ) from None
        return cls.from_dict(data)
