"""How much each quantization recipe changes what the model computes, against float32.

Measured on the tiny fixture checkpoints and on a random-weight checkpoint at the real
LFM2-VL-450M shapes (`checkpoint_450m_real`: the published config, built by the reference
`Lfm2VlForConditionalGeneration` with its own random init and a fixed seed, saved in bf16 as
published). Random weights are an imperfect
proxy for trained ones: their next-token distributions are nearly flat (so KL is small but top-1
is decided by tiny margins and flips easily), and they have none of the outlier channels trained
models have. The bounds below are regression guards on this proxy, not predictions for real
checkpoints; docs/quantization.md has the numbers.

Metrics, over a fixed set of small image+text prompts (each recipe vs the float32 model):
- KL(p_float || p_quant) of next-token distributions, mean over the positions after the image;
- top-1 agreement at those positions;
- cosine similarity of the image embeddings (projector output), mean over image tokens;
- greedy prefix match: how many of the first GREEDY_TOKENS greedy tokens are identical.

At the 450M shapes, quantized matmuls on this CPU backend are far too slow for the CI budget, so
each recipe's model is quantized exactly as the converter does (`quantize_model`) and its layers
are then dequantized to float32 Linear/Embedding layers. Those are the very weights the quantized
kernels use (codes * scale + bias); `test_dequantized_model_matches_quantized_kernels` proves on
the fixtures that the two give the same logits to float32 rounding.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lfm2vl.convert import convert, quantization_plan, quantize_model
from mlx_lfm2vl.image_processor import ImageProcessor
from mlx_lfm2vl.loading import load_model
from mlx_lfm2vl.models.lfm2_vl import Lfm2VlModel
from mlx_lfm2vl.shapes.quality import mean_agreement

GREEDY_TOKENS = 6
IMAGE_START, IMAGE_END = 498, 499


@dataclass
class Prompt:
    input_ids: mx.array
    pixel_values: mx.array
    spatial_shapes: np.ndarray
    first_text: int  # index of the first position after <|image_end|>
    image_slots: mx.array  # positions of the <image> tokens


@dataclass
class Metrics:
    kl: float
    top1: float
    cosine: float
    prefix: float  # mean greedy prefix match, in tokens

    def __str__(self) -> str:
        return (
            f"KL {self.kl:.2e}  top-1 {self.top1:.3f}  cos {self.cosine:.5f}  "
            f"prefix {self.prefix:.2f}/{GREEDY_TOKENS}"
        )


def synthetic_images() -> list[np.ndarray]:
    """Three small deterministic RGB images with structure (a natural-image proxy)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:224, 0:288] / 64.0
    waves = np.stack([np.sin(x + y), np.cos(2 * x - y), np.sin(3 * y)], axis=-1)
    blocks = np.kron(rng.random((7, 9, 3)), np.ones((32, 32, 1)))
    smooth = np.cumsum(np.cumsum(rng.standard_normal((256, 192, 3)), 0), 1)
    smooth = (smooth - smooth.min()) / np.ptp(smooth)
    return [
        ((waves + 1) * 127.5).astype(np.uint8),
        (blocks * 255).astype(np.uint8),
        (smooth * 255).astype(np.uint8),
    ]


def build_prompts(folder: Path, image_token_id: int, vocab: int) -> list[Prompt]:
    """`<bos><|im_start|> text <|image_start|> <image>*n <|image_end|> text` per image.

    Token ids are built directly (no tokenizer needed at the 450M shapes); text ids are random
    ordinary-vocabulary ids, fixed by the seed. Images stay single views of <= 64 tokens.
    """
    processor = ImageProcessor.from_pretrained(folder)
    rng = np.random.default_rng(1)
    prompts = []
    for image in synthetic_images():
        batch = processor(image, max_image_tokens=64, min_image_tokens=16, do_image_splitting=False)
        shapes = batch.spatial_shapes
        n_tokens = int(sum((h // 2) * (w // 2) for h, w in shapes))
        before = rng.integers(1000, min(vocab, 60000), 6).tolist()
        after = rng.integers(1000, min(vocab, 60000), 10).tolist()
        ids = [1, 6, *before, IMAGE_START] + [image_token_id] * n_tokens + [IMAGE_END, *after]
        prompts.append(
            Prompt(
                input_ids=mx.array([ids], dtype=mx.int32),
                pixel_values=mx.array(batch.pixel_values),
                spatial_shapes=shapes,
                first_text=ids.index(IMAGE_END),
                image_slots=mx.array(np.flatnonzero(np.array(ids) == image_token_id)),
            )
        )
    return prompts


@dataclass
class Outputs:
    log_probs: list[mx.array]  # per prompt: (positions after the image, vocab), float32
    image_embeddings: list[mx.array]
    greedy: list[list[int]]


def run(model: nn.Module, prompts: list[Prompt]) -> Outputs:
    log_probs, embeddings, greedy = [], [], []
    for p in prompts:
        # The image embeddings are read back from the merged input embeddings, so the vision
        # tower runs once per prompt.
        inputs_embeds = model.get_input_embeddings(p.input_ids, p.pixel_values, p.spatial_shapes)
        embeddings.append(inputs_embeds[0, p.image_slots])
        cache = model.make_cache()
        # The LM head only where it is compared: at 64K-128K outputs it is most of the work.
        hidden = model.language_model(inputs_embeds, cache)
        logits = model.lm_head_logits(hidden[:, p.first_text :])[0].astype(mx.float32)
        log_probs.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        tokens = [int(mx.argmax(logits[-1]))]
        for _ in range(GREEDY_TOKENS - 1):
            step = model(mx.array([[tokens[-1]]], dtype=mx.int32), cache=cache)[0, -1]
            tokens.append(int(mx.argmax(step)))
        greedy.append(tokens)
        mx.eval(log_probs[-1], embeddings[-1])
    return Outputs(log_probs, embeddings, greedy)


def compare(base: Outputs, other: Outputs) -> Metrics:
    kl, top1, cosine = mean_agreement(
        base.log_probs, other.log_probs, base.image_embeddings, other.image_embeddings
    )
    prefix = [
        next((i for i, (a, b) in enumerate(zip(ga, gb, strict=True)) if a != b), len(ga))
        for ga, gb in zip(base.greedy, other.greedy, strict=True)
    ]
    return Metrics(kl, top1, cosine, float(np.mean(prefix)))


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a float32 layer holding its dequantized weights."""
    layers = []
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        biases = m.get("biases")
        weight = mx.dequantize(
            m.weight,
            m.scales if m.mode != "affine" else m.scales.astype(mx.float32),
            biases.astype(mx.float32) if biases is not None else None,
            group_size=m.group_size,
            bits=m.bits,
            mode=m.mode,
        ).astype(mx.float32)
        if isinstance(m, nn.QuantizedLinear):
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in m)
            if "bias" in m:
                layer.bias = m.bias.astype(mx.float32)
        else:
            layer = nn.Embedding(*weight.shape)
        layer.weight = weight
        layers.append((path, layer))
    model.update_modules(tree_unflatten(layers))
    mx.eval(model.parameters())
    return model


def quantized(source: nn.Module, recipe: str, dequantize: bool, **options) -> nn.Module:
    """The model the converter would write for `recipe`, built in memory, computing in float32.

    `source` is the float32 model; its weight arrays are shared, not copied or changed.
    """
    model = Lfm2VlModel(source.config)
    model.load_weights(tree_flatten(source.parameters()))
    quantize_model(model, quantization_plan(model, recipe, **options), mx.bfloat16)
    if dequantize:
        return dequantize_model(model)
    # What the loader does for a converted folder on the CPU: scales and biases in float32.
    model.update(
        tree_unflatten(
            [
                (name, value.astype(mx.float32))
                for name, value in tree_flatten(model.parameters())
                if mx.issubdtype(value.dtype, mx.floating)
            ]
        )
    )
    return model


# ---------------------------------------------------------------------------------------------
# Tiny fixtures: every recipe with the real quantized kernels.

# Bounds from measurement on the three fixtures (worst fixture, real quantized kernels; table in
# the README), with margin. Measured worst: uniform-8 KL 3.9e-5, top-1 0.88, cos
# 0.99994; mixed-4 KL 6.4e-3, top-1 0.33, cos 0.99994; lm-4 KL 8.0e-3, top-1 0.12, cos 1;
# uniform-4 KL 1.2e-2, top-1 0.27, cos 0.981. KL bounds sit 2-5x above the worst measurement; a
# broken recipe (a layer with wrong scales, a garbled vision tower) gives KL 5e-2 or more and
# cosines near 0.3, as the first version of this converter did by quantizing the patch
# embedding. Top-1 at 4 bits is low on random weights (flat distributions, tiny margins: see the
# module docstring), so its floors only separate "close" from "broken" (a broken model agrees on
# ~0 of 33 positions).
FIXTURE_BOUNDS = {
    # recipe: (max KL, min top-1, min image cosine)
    "uniform-8": (2e-4, 0.8, 0.9995),
    "mixed-4": (1.5e-2, 0.2, 0.9995),
    "lm-4": (2e-2, 0.05, 1.0 - 1e-6),
    "uniform-4": (3e-2, 0.1, 0.96),
}


@pytest.fixture(scope="module")
def fixture_baseline(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    prompts = build_prompts(
        checkpoint, config["image_token_id"], config["text_config"]["vocab_size"]
    )
    model = load_model(checkpoint, dtype=mx.float32)
    return model, prompts, run(model, prompts)


@pytest.mark.parametrize("recipe", sorted(FIXTURE_BOUNDS))
def test_recipe_accuracy_on_fixtures_within_bounds(checkpoint, fixture_baseline, recipe):
    model, prompts, base = fixture_baseline
    metrics = compare(base, run(quantized(model, recipe, dequantize=False), prompts))
    max_kl, min_top1, min_cosine = FIXTURE_BOUNDS[recipe]
    print(f"{checkpoint.name} {recipe}: {metrics}")
    assert metrics.kl <= max_kl, metrics
    assert metrics.top1 >= min_top1, metrics
    assert metrics.cosine >= min_cosine, metrics


def test_dequantized_model_matches_quantized_kernels(checkpoint_16b):
    # The 450M-shape measurements use dequantized float32 weights; this shows they compute what
    # the quantized kernels compute, image path included. Both paths do float32 arithmetic on
    # the same weight values, so only summation order differs: 1e-4 relative to the logits'
    # scale is float32 rounding, far below the 4-bit effect itself (max |diff| of order 1).
    config = json.loads((checkpoint_16b / "config.json").read_text())
    prompt = build_prompts(checkpoint_16b, config["image_token_id"], 65536)[0]
    inputs = (prompt.input_ids, prompt.pixel_values, prompt.spatial_shapes)
    model = load_model(checkpoint_16b, dtype=mx.float32)
    for recipe in ("mixed-4", "uniform-4"):
        kernels = quantized(model, recipe, dequantize=False)(*inputs)
        floats = quantized(model, recipe, dequantize=True)(*inputs)
        scale = mx.abs(floats).max().item()
        assert mx.abs(kernels - floats).max().item() <= 1e-4 * max(1.0, scale)


# ---------------------------------------------------------------------------------------------
# Random weights at the real LFM2-VL-450M shapes.

# Bounds from measurement at the 450M shapes (dequantized weights, see the module docstring),
# with margin. Measured: uniform-8 KL 3.6e-4, top-1 0.91, cos 0.99987, prefix 3.7/8; mixed-4 KL
# 4.6e-2, top-1 0.24, cos 0.99987, prefix 0; uniform-4 KL 8.3e-2, top-1 0.18, cos 0.958, prefix
# 0.3. KL bounds are ~2-4x the measurement. The full-width random model's distributions are even
# flatter than the fixtures' (65536 logits of std ~0.6), so at 4 bits the greedy prefix is ~0 and
# top-1 is a coin toss among near-ties; only 8-bit gets a prefix floor.
REAL_450M_BOUNDS = {
    # recipe: (max KL, min top-1, min image cosine, min mean greedy prefix)
    "uniform-8": (1.5e-3, 0.75, 0.9995, 1.0),
    "mixed-4": (0.1, 0.1, 0.9995, 0.0),
    "uniform-4": (0.2, 0.05, 0.93, 0.0),
}


@pytest.fixture(scope="module")
def real_450m(checkpoint_450m_real):
    folder = checkpoint_450m_real
    config = json.loads((folder / "config.json").read_text())
    prompts = build_prompts(folder, config["image_token_id"], config["text_config"]["vocab_size"])
    model = load_model(folder, dtype=mx.float32)
    base = run(model, prompts)
    results = {
        recipe: compare(base, run(quantized(model, recipe, dequantize=True), prompts))
        for recipe in REAL_450M_BOUNDS
    }
    for recipe, metrics in results.items():
        print(f"450M shapes {recipe}: {metrics}")
    return results


@pytest.mark.parametrize("recipe", sorted(REAL_450M_BOUNDS))
def test_recipe_accuracy_at_450m_shapes_within_bounds(real_450m, recipe):
    metrics = real_450m[recipe]
    max_kl, min_top1, min_cosine, min_prefix = REAL_450M_BOUNDS[recipe]
    assert metrics.kl <= max_kl, metrics
    assert metrics.top1 >= min_top1, metrics
    assert metrics.cosine >= min_cosine, metrics
    assert metrics.prefix >= min_prefix, metrics


def test_mixed_recipe_beats_uniform_4bit_at_450m_shapes(real_450m):
    mixed, uniform = real_450m["mixed-4"], real_450m["uniform-4"]
    assert mixed.kl < uniform.kl
    assert mixed.cosine > uniform.cosine


def test_converted_450m_size_and_load_time(checkpoint_450m_real, tmp_path):
    # The default recipe written to disk at the real shapes: its size is what estimate_bytes
    # says (the README's size figures come from it), and it loads in seconds.
    result = convert(checkpoint_450m_real, tmp_path / "out", quantize=True)
    start = time.perf_counter()
    load_model(result.path)
    seconds = time.perf_counter() - start
    print(
        f"450M shapes mixed-4: {result.bytes_on_disk / 1e6:.1f} MB on disk, "
        f"{result.bits_per_weight:.2f} bits/weight, convert {result.seconds:.1f} s, "
        f"load {seconds:.2f} s"
    )
    assert 5.9 < result.bits_per_weight < 6.0  # 336 MB: 4.5 bits body, 8.5 bits elsewhere
    assert seconds < 30
