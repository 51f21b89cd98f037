"""The reference (`transformers`, torch CPU, float32) and its inputs in the port's layout."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np


@lru_cache(maxsize=4)
def reference_model(folder: Path):
    import torch
    from transformers import Lfm2VlForConditionalGeneration

    return Lfm2VlForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


@lru_cache(maxsize=4)
def reference_processor(folder: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)


def image_message(text: str, n_images: int = 1) -> list[dict]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def reference_inputs(folder: Path, messages: list[dict], images=None, **image_options) -> dict:
    """What the reference processor makes of a conversation (torch tensors, padded views)."""
    processor = reference_processor(folder)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=images, text=text, return_tensors="pt", **image_options)


def port_inputs(reference: dict) -> dict:
    """The same inputs in the port's layout: views packed one after another, no padding."""
    inputs = {"input_ids": mx.array(reference["input_ids"].numpy().astype(np.int32))}
    if "pixel_values" in reference:
        real = reference["pixel_attention_mask"].bool()
        inputs["pixel_values"] = mx.array(reference["pixel_values"][real].numpy())
        inputs["spatial_shapes"] = mx.array(reference["spatial_shapes"].numpy().astype(np.int32))
    return inputs


def random_image(height: int, width: int, seed: int = 0):
    """A smooth random RGB image (noise alone would make every resize look alike)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    noise = rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=int) + noise, 0, 255).astype(np.uint8))


def max_error(port: mx.array, reference) -> tuple[float, float]:
    """(max abs difference, max abs reference value)."""
    expected = reference.detach().numpy() if hasattr(reference, "detach") else np.asarray(reference)
    actual = np.asarray(port.astype(mx.float32))
    return float(np.abs(actual - expected).max()), float(np.abs(expected).max())
