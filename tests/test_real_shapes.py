"""Parity at the real LFM2-VL-450M shapes (random weights in bf16, computed in float32).

The shrunk fixtures keep head counts and geometry but not widths; this test catches anything that
only shows at full width (head_dim 64, 1024-wide LM, 768-wide 12-layer vision tower, 4608 FFN).
"""

from __future__ import annotations

import torch
from reference import image_message, max_error, port_inputs, random_image, reference_inputs

from mlx_lfm2vl.loading import load_model


def test_logits_match_reference_at_real_450m_shapes(checkpoint_450m_real):
    from transformers import Lfm2VlForConditionalGeneration

    image = random_image(256, 384, seed=7)
    ref_inputs = reference_inputs(checkpoint_450m_real, image_message("What is shown?"), [image])
    assert ref_inputs["spatial_shapes"].tolist() == [[16, 24]]  # the model card's 96-token case
    reference = Lfm2VlForConditionalGeneration.from_pretrained(
        checkpoint_450m_real, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = reference(**ref_inputs).logits[0]
    del reference
    actual = load_model(checkpoint_450m_real, dtype="float32")(**port_inputs(ref_inputs))[0]
    error, scale = max_error(actual, expected)
    assert error <= 1e-4 * max(1.0, scale), f"max abs error {error:.3g} at scale {scale:.3g}"
