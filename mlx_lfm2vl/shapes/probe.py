"""What the shapes model's vision tower can learn on its own: a diagnostic for the build.

    python -m mlx_lfm2vl.shapes.probe --kind shape --vision-width 64

Trains a fresh vision tower and projector of the shapes model (`build.model_config`, same
initial weights, the tower's width and depth changeable) together with a linear classifier on
the mean of the projector's output tokens, on the task's pictures that answer one kind of
question, and prints the accuracy on held-out pictures as it goes. No language model is
involved, so this separates what the tower learns from a picture from what the whole model
learns to route from the image tokens to an answer, in a few minutes instead of a build's
fifteen. docs/shapes.md has what it measured.

Position is not offered: the mean of the tokens does not say where they were.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from PIL import Image

from . import build, task

KINDS = ("color", "shape", "count", "word")
LABELS = {
    "color": tuple(task.COLORS),
    "shape": task.SHAPES,
    "count": tuple(str(n) for n in task.COUNTS),
    "word": task.WORDS,
}


def pictures(kind: str, split: str, count: int) -> list[tuple[Image.Image, int]]:
    """The first `count` pictures of `split` that answer `kind`, with the answer's index."""
    found, index = [], 0
    while len(found) < count:
        item = task.example(split, index)
        index += 1
        for asked, _, answer in item.questions:
            if asked == kind:
                found.append((item.image, LABELS[kind].index(answer)))
    return found


class Probe(nn.Module):
    """The shapes model's vision tower and projector, and a linear classifier on the mean of
    the image tokens they make."""

    def __init__(self, model, classes: int):
        super().__init__()
        self.vision_tower = model.vision_tower
        self.multi_modal_projector = model.multi_modal_projector
        self._features = model.get_image_features  # uses the two modules above
        self.classifier = nn.Linear(model.multi_modal_projector.linear_2.weight.shape[0], classes)

    def __call__(self, pixel_values: mx.array, spatial_shapes: mx.array) -> mx.array:
        return self.classifier(self._features(pixel_values, spatial_shapes).mean(axis=0))


def probe_model(kind: str, vision_width: int, vision_layers: int, seed: int) -> Probe:
    from ..config import ModelConfig
    from ..models.lfm2_vl import Lfm2VlModel

    config = build.model_config(vocab_size=512)  # the language model is not used
    config["vision_config"].update(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
    )
    model = Lfm2VlModel(ModelConfig.from_dict(config))
    model.load_weights(list(build.initial_parameters(config, seed).items()))
    return Probe(model, len(LABELS[kind]))


def run(
    kind: str = "shape",
    vision_width: int = 128,
    vision_layers: int = 4,
    steps: int = 1300,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    warmup: int = 100,
    train_pictures: int = 12000,
    valid_pictures: int = 400,
    report_every: int = 100,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[tuple[int, float]]:
    """Train the probe; returns (step, held-out accuracy) at every report."""
    from ..image_processor import ImageProcessor, ImageProcessorSettings

    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    processor = ImageProcessor(ImageProcessorSettings.from_dict({**build.PROCESSOR, "resample": 3}))

    def inputs(image: Image.Image) -> tuple[mx.array, mx.array]:
        batch = processor(image)
        return mx.array(batch.pixel_values), mx.array(batch.spatial_shapes)

    train = pictures(kind, "train", train_pictures)
    valid = [(inputs(image), label) for image, label in pictures(kind, "valid", valid_pictures)]
    probe = probe_model(kind, vision_width, vision_layers, seed)

    def loss(model: Probe, batch: list) -> mx.array:
        logits = mx.stack([model(*pixels) for pixels, _ in batch])
        labels = mx.array([label for _, label in batch])
        return nn.losses.cross_entropy(logits, labels, reduction="mean")

    def accuracy() -> float:
        right = [int(probe(*pixels).argmax().item()) == label for pixels, label in valid]
        return float(np.mean(right))

    rate = learning_rate
    if warmup:
        warm = optim.linear_schedule(learning_rate * 0.01, learning_rate, warmup)
        rate = optim.join_schedules([warm, lambda _: learning_rate], [warmup])
    optimizer = optim.AdamW(learning_rate=rate, weight_decay=0.0, bias_correction=True)
    value_and_grad = nn.value_and_grad(probe, loss)
    order = np.random.default_rng(seed)
    history, began, losses = [], time.perf_counter(), []
    for step in range(1, steps + 1):
        chosen = order.integers(len(train), size=batch_size)
        batch = [(inputs(train[i][0]), train[i][1]) for i in chosen]
        value, gradients = value_and_grad(probe, batch)
        optimizer.update(probe, gradients)
        mx.eval(probe.parameters(), optimizer.state)
        losses.append(value.item())
        if step % report_every == 0 or step == steps:
            history.append((step, accuracy()))
            log(
                f"step {step}/{steps}: loss {np.mean(losses):.3f}, held-out accuracy "
                f"{history[-1][1]:.1%} ({time.perf_counter() - began:.0f} s)"
            )
            losses = []
    return history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="shape", choices=KINDS, help="question to learn")
    parser.add_argument("--vision-width", type=int, default=128, help="(the build's: 128)")
    parser.add_argument("--vision-layers", type=int, default=4, help="(the build's: 4)")
    parser.add_argument("--steps", type=int, default=1300)
    parser.add_argument("--batch-size", type=int, default=16, help="pictures a step")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="steps of linear lr warm-up")
    parser.add_argument("--train-pictures", type=int, default=12000)
    parser.add_argument("--valid-pictures", type=int, default=400)
    parser.add_argument("--report-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("vision_layers", "steps", "batch_size", "train_pictures", "valid_pictures"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.vision_width < 2 or args.vision_width % 2:
        parser.error("--vision-width must be an even number: the tower has two attention heads")
    run(**vars(args), log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
