"""The MLX model against the reference `Lfm2VlForConditionalGeneration`, in float32.

Inputs come from the reference processor, so these tests pin the model alone. Errors are compared
to the reference's own magnitude: max |port - reference| <= 1e-4 * max(1, max |reference|).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from reference import (
    image_message,
    max_error,
    port_inputs,
    random_image,
    reference_inputs,
    reference_model,
)

from mlx_lfm2vl.loading import load_model

TOLERANCE = 1e-4

# One image per fixture whose views differ in shape: tiles (32x32 patches) plus a thumbnail of
# another grid where the fixture's processor makes one; a single view for the 450M-like
# processor with splitting off. Tile counts are capped to keep the suite fast.
CASES = {
    "lfm2-vl-450m": dict(size=(384, 256), options={}),
    "lfm2-vl-1.6b": dict(size=(768, 1024), options={"max_tiles": 2}),
    "lfm2.5-vl": dict(size=(700, 900), options={"max_tiles": 2}),
}


def assert_close(port, reference, what: str) -> None:
    error, scale = max_error(port, reference)
    assert error <= TOLERANCE * max(1.0, scale), (
        f"{what}: max abs error {error:.3g}, scale {scale:.3g}"
    )


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """The port model, the reference inputs and the reference's outputs, computed once."""
    case = CASES[checkpoint.name]
    image = random_image(*case["size"], seed=1)
    messages = image_message("Describe this image.")
    ref_inputs = reference_inputs(checkpoint, messages, images=[image], **case["options"])
    reference = reference_model(checkpoint)
    vision_inputs = {
        key: ref_inputs[key] for key in ("pixel_values", "spatial_shapes", "pixel_attention_mask")
    }
    with torch.no_grad():
        expected = {
            "vision": reference.model.vision_tower(**vision_inputs).last_hidden_state,
            "features": torch.cat(
                reference.model.get_image_features(**vision_inputs).pooler_output
            ),
            "logits": reference(**ref_inputs).logits[0],
        }
    return load_model(checkpoint), ref_inputs, expected


def test_vision_tower_output_matches_reference_per_view(loaded):
    model, ref_inputs, reference = loaded
    expected = reference["vision"]
    inputs = port_inputs(ref_inputs)
    offset = 0
    for view, (h, w) in enumerate(ref_inputs["spatial_shapes"].tolist()):
        patches = inputs["pixel_values"][offset : offset + h * w][None]
        offset += h * w
        actual = model.vision_tower(patches, h, w)[0]
        assert_close(actual, expected[view, : h * w], f"view {view} ({h}x{w})")


def test_projected_image_features_match_reference(loaded):
    model, ref_inputs, reference = loaded
    inputs = port_inputs(ref_inputs)
    actual = model.get_image_features(inputs["pixel_values"], inputs["spatial_shapes"])
    assert_close(actual, reference["features"], "projector output")


def test_logits_match_reference_for_an_image_prompt(loaded):
    model, ref_inputs, reference = loaded
    expected = reference["logits"]
    actual = model(**port_inputs(ref_inputs))[0]
    assert actual.shape == tuple(expected.shape)
    assert_close(actual, expected, "logits")


@pytest.mark.cpu_backend
def test_features_and_logits_match_reference_with_row_work_in_small_blocks(
    loaded, checkpoint, monkeypatch
):
    # Block size 1 element: every MLP/feed-forward over more than 64 rows (the floor) runs in
    # blocks of 64, most ending mid-view, so a block boundary that mixed rows would show.
    from mlx_lfm2vl.cpu import ops

    monkeypatch.setattr(ops, "_ROW_BLOCK", 1)
    _, ref_inputs, reference = loaded
    model = load_model(checkpoint)  # with the CPU backend, whatever the mode
    inputs = port_inputs(ref_inputs)
    assert int(np.prod(ref_inputs["spatial_shapes"].tolist()[0])) > 64
    assert inputs["input_ids"].shape[1] > 64
    features = model.get_image_features(inputs["pixel_values"], inputs["spatial_shapes"])
    assert_close(features, reference["features"], "projector output, blocked rows")
    assert_close(model(**inputs)[0], reference["logits"], "logits, blocked rows")


def test_logits_match_reference_for_a_text_only_prompt(checkpoint):
    ref_inputs = reference_inputs(checkpoint, [{"role": "user", "content": "Hello, who are you?"}])
    with torch.no_grad():
        expected = reference_model(checkpoint)(**ref_inputs).logits[0]
    actual = load_model(checkpoint)(**port_inputs(ref_inputs))[0]
    assert_close(actual, expected, "text-only logits")


def test_tiled_image_views_differ_in_shape_and_all_match(checkpoint_16b):
    """Tiles and the thumbnail have different patch grids; both kinds go through correctly."""
    image = random_image(600, 1100, seed=2)
    ref_inputs = reference_inputs(
        checkpoint_16b, image_message("What is this?"), images=[image], max_tiles=3
    )
    shapes = {tuple(s) for s in ref_inputs["spatial_shapes"].tolist()}
    assert len(shapes) >= 2, f"expected tiles and a differently shaped thumbnail, got {shapes}"
    with torch.no_grad():
        expected = reference_model(checkpoint_16b)(**ref_inputs).logits[0, -8:]
    actual = load_model(checkpoint_16b)(**port_inputs(ref_inputs))[0, -8:]
    assert_close(actual, expected, "logits after a tiled image")


def test_two_images_in_one_prompt_match_reference(checkpoint_450m):
    images = [random_image(256, 256, seed=3), random_image(320, 480, seed=4)]
    ref_inputs = reference_inputs(checkpoint_450m, image_message("Compare.", 2), images=images)
    with torch.no_grad():
        expected = reference_model(checkpoint_450m)(**ref_inputs).logits[0]
    actual = load_model(checkpoint_450m)(**port_inputs(ref_inputs))[0]
    assert_close(actual, expected, "two-image logits")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_incremental_decoding_with_cache_matches_full_forward(checkpoint_16b, dtype):
    """Prefill, then single tokens, then a multi-token chunk: same logits as one full pass."""
    model = load_model(checkpoint_16b, dtype=dtype)
    ref_inputs = reference_inputs(
        checkpoint_16b, image_message("Count the dots."), images=[random_image(200, 300, seed=5)]
    )
    inputs = port_inputs(ref_inputs)
    rng = np.random.default_rng(0)
    continuation = mx.array(rng.integers(600, 1000, (1, 9)).astype(np.int32))
    full_ids = mx.concatenate([inputs["input_ids"], continuation], axis=1)
    full = model(full_ids, inputs["pixel_values"], inputs["spatial_shapes"])

    cache = model.make_cache()
    L = inputs["input_ids"].shape[1]
    pieces = [model(cache=cache, **inputs)]
    for i in range(4):  # one token at a time
        pieces.append(model(continuation[:, i : i + 1], cache=cache))
    pieces.append(model(continuation[:, 4:], cache=cache))  # a chunk appended to the cache
    incremental = mx.concatenate(pieces, axis=1).astype(mx.float32)
    full = full.astype(mx.float32)
    assert incremental.shape == full.shape
    error = float(mx.abs(incremental - full).max())
    # bf16: the products of one row and of many round differently (8 bits of mantissa)
    tolerance = 1e-4 if dtype == "float32" else 3e-2
    assert error <= tolerance * max(1.0, float(mx.abs(full).max())), error
    assert all(c.offset == L + 9 for c in cache), [c.offset for c in cache]


def test_prompt_with_fewer_image_tokens_than_features_is_a_clear_error(checkpoint_450m):
    from mlx_lfm2vl import Lfm2VlError

    ref_inputs = reference_inputs(
        checkpoint_450m, image_message("Hi"), images=[random_image(256, 256, seed=6)]
    )
    inputs = port_inputs(ref_inputs)
    ids = np.asarray(inputs["input_ids"]).copy()
    ids[0, np.flatnonzero(ids[0] == 396)[0]] = 1000  # drop one <image> slot
    with pytest.raises(Lfm2VlError, match="image tokens"):
        load_model(checkpoint_450m)(mx.array(ids), inputs["pixel_values"], inputs["spatial_shapes"])


@pytest.fixture(scope="module")
def bf16_checkpoint(checkpoint, tmp_path_factory):
    """The fixture saved in bf16, as checkpoints are published."""
    import shutil

    from transformers import Lfm2VlForConditionalGeneration

    folder = tmp_path_factory.mktemp("bf16") / checkpoint.name
    shutil.copytree(checkpoint, folder)
    (folder / "model.safetensors").unlink()
    reference = Lfm2VlForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    reference.to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_bf16_logits_are_no_worse_than_the_references_own_bf16(bf16_checkpoint, code_path):
    """bf16 compute, as a Mac runs the published weights, against the reference in float32 on
    the same weights: the port's error is no larger than the reference's own in bf16."""
    from transformers import Lfm2VlForConditionalGeneration

    case = CASES[bf16_checkpoint.name]
    messages = image_message("Describe this image.")
    image = random_image(*case["size"], seed=1)
    inputs = reference_inputs(bf16_checkpoint, messages, images=[image], **case["options"])
    reference_logits = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            model = Lfm2VlForConditionalGeneration.from_pretrained(bf16_checkpoint, dtype=dtype)
            reference_logits[dtype] = model(**inputs).logits[0].float()
    expected = reference_logits[torch.float32]
    in_bf16 = mx.array(reference_logits[torch.bfloat16].numpy())
    reference_error, scale = max_error(in_bf16, expected)
    # On the Metal path the stored bf16 is the default; the CPU backend needs asking.
    dtype = None if code_path == "metal" else "bfloat16"
    model = load_model(bf16_checkpoint, dtype=dtype)
    assert model.language_model.embedding_norm.weight.dtype == mx.bfloat16
    logits = model(**port_inputs(inputs))[0]
    assert logits.dtype == mx.bfloat16
    port_error, _ = max_error(logits, expected)
    assert port_error <= 1.5 * reference_error, (port_error, reference_error, scale)
    assert reference_error > 1e-3 * scale  # bf16 really was used on both sides
