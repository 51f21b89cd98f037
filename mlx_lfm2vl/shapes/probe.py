"""What the shapes model's vision tower can learn on its own: a diagnostic for the build.

    python -m mlx_lfm2vl.shapes.probe --kind shape --vision-width 64

Trains a fresh vision tower and projector of the shapes model (`build.model_config`, same
initial weights, the tower's width and depth changeable) together with a linear classifier per
kind of question (`--kind`, one or more) on the mean of a picture's image tokens (the
projector's output), on the task's pictures that answer those kinds, and prints the accuracy on
held-out pictures as it goes. No language model is involved, so this separates what the tower
learns from a picture from what the whole model learns to route from the image tokens to an
answer, in a few minutes instead of a build's fifteen. docs/shapes.md has what it measured.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from PIL import Image

from ..image_processor import plan_image
from . import build, task

LABELS = {
    "color": tuple(task.COLORS),
    "shape": task.SHAPES,
    "count": tuple(str(n) for n in task.COUNTS),
    "position": task.QUADRANTS,
    "word": task.WORDS,
}
KINDS = tuple(LABELS)
# Steps' worth of pictures whose mean tokens fit a stage's classifiers before its tower trains
# (`train`'s classifier_steps).
FITTING_BATCHES = 32


def pictures(kinds: Sequence[str], split: str, count: int) -> list[tuple[Image.Image, dict]]:
    """The first `count` pictures of `split` that answer one of `kinds`, each with the index of
    every answer of those kinds it has."""
    found = []
    for index in itertools.count():
        if len(found) == count:
            break
        if not set(kinds) & set(task.answerable(task.kind_of(split, index))):
            continue  # not drawn: four in five pictures are of shapes, and drawing takes time
        item = task.example(split, index)
        labels = {k: LABELS[k].index(answer) for k, _, answer in item.questions if k in kinds}
        if labels:
            found.append((item.image, labels))
    return found


def repeated(pool: list[tuple[Image.Image, dict]], repeats: Mapping[str, int]) -> list:
    """`pool` with each picture `repeats[kind]` times in all (1 for kinds not named; the most
    of its kinds' for a picture that answers several), so that training draws those kinds more
    often."""
    out = []
    for picture in pool:
        out += [picture] * max(repeats.get(kind, 1) for kind in picture[1])
    return out


def averaging_matrix(tokens_per_picture: Sequence[int]) -> mx.array:
    """(pictures, tokens) weights that average each picture's run of tokens in a packed batch."""
    ends = np.cumsum(tokens_per_picture)
    weights = np.zeros((len(ends), int(ends[-1])), np.float32)
    for row, (start, end) in enumerate(zip(ends - tokens_per_picture, ends, strict=True)):
        weights[row, start:end] = 1.0 / (end - start)
    return mx.array(weights)


class Probe(nn.Module):
    """The shapes model's vision tower and projector, and a linear classifier for each kind of
    question on the mean of a picture's image tokens.

    Position too is read from the mean, so the tokens themselves must say where they are: that
    is how the language model sees them. (A first version read the means of the four quadrants
    of the picture's last view; the classifier then knew where every token was, the tower
    learned nothing of it, and the whole model trained after it answered 28% of position
    questions, chance 25%: docs/shapes.md, run 20.)

    The classifiers of the kinds in `center` read each picture's mean less the mean of the
    step's pictures: what the pictures share is most of each mean, and a classifier must
    otherwise learn to see past it before the tower is told anything useful (words alone: at
    chance for 600 steps raw, 70% centred; docs/shapes.md)."""

    def __init__(self, model, kinds: Sequence[str], seed: int = 0, center: Sequence[str] = ()):
        super().__init__()
        self.center = tuple(center)
        self.vision_tower = model.vision_tower
        self.multi_modal_projector = model.multi_modal_projector
        self._features = model.get_image_features  # uses the two modules above
        width = model.multi_modal_projector.linear_2.weight.shape[0]
        self.classifiers = {}
        keys = mx.random.split(mx.random.key(seed), len(kinds))
        for kind, key in zip(kinds, keys, strict=True):
            classifier = nn.Linear(width, len(LABELS[kind]))
            # weights as nn.Linear draws them, but from the seed (not MLX's global generator)
            bound = width**-0.5
            classifier.weight = mx.random.uniform(-bound, bound, classifier.weight.shape, key=key)
            classifier.bias = mx.zeros(classifier.bias.shape)
            self.classifiers[kind] = classifier

    def means(self, batch: Batch) -> mx.array:
        """(pictures, width): each picture's mean image token."""
        return batch.averaging @ self._features(batch.pixel_values, batch.spatial_shapes)

    def __call__(self, batch: Batch, group: mx.distributed.Group | None = None) -> dict:
        """Logits (pictures, answers) of every kind, for a packed batch of pictures (with
        `group`, this process's share of a step's `batch.step_pictures`), from its pictures'
        mean tokens as `batch.means` holds them or as the tower makes them."""
        means = self.means(batch) if batch.means is None else batch.means
        centered = means
        if self.center:
            # the mean over the step's pictures, every process's share of them (a validation
            # batch is one process's alone)
            total = means.sum(axis=0)
            if group is not None and group.size() > 1:
                total = summed_across(group)(total)
            centered = means - total / (batch.step_pictures or len(batch.labels))
        return {
            kind: classifier(centered if kind in self.center else means)
            for kind, classifier in self.classifiers.items()
        }


def summed_across(group: mx.distributed.Group) -> Callable[[mx.array], mx.array]:
    """`mx.distributed.all_sum` over `group` whose gradient is summed across it too. (MLX's own
    passes each process's gradient straight back: right for summed gradients, but a sum every
    process's loss depends on needs every process's part of the gradient.)"""

    @mx.custom_function
    def all_sum(x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=group)

    @all_sum.vjp
    def all_sum_vjp(primals, cotangent: mx.array, output) -> mx.array:
        return mx.distributed.all_sum(cotangent, group=group)

    return all_sum


@dataclass
class Batch:
    """Pictures packed as one processor output: all their views' patches in a row, so that the
    tower runs the views of one grid size (most tiles and single views) as one batch."""

    pixel_values: mx.array
    spatial_shapes: np.ndarray
    averaging: mx.array  # (pictures, tokens): each picture's mean token
    labels: list[dict[str, int]]
    step_pictures: int = 0  # of a step shared among processes: its pictures in all
    means: mx.array | None = None  # the pictures' mean tokens, once computed and kept

    @classmethod
    def pack(cls, processor, pictures: Sequence[tuple[Image.Image, dict]]) -> Batch:
        outputs = [processor(image) for image, _ in pictures]
        tokens = [int((out.spatial_shapes // 2).prod(axis=1).sum()) for out in outputs]
        return cls(
            mx.concatenate([mx.array(out.pixel_values) for out in outputs]),
            np.concatenate([out.spatial_shapes for out in outputs]),
            averaging_matrix(tokens),
            [labels for _, labels in pictures],
        )

    def answers(self, kind: str) -> tuple[list[int], list[int]]:
        """The pictures that answer `kind` (rows of the batch) and their answers."""
        rows = [row for row, labels in enumerate(self.labels) if kind in labels]
        return rows, [self.labels[row][kind] for row in rows]


def probe_config(vision_width: int, vision_layers: int) -> dict:
    """The shapes model's config with the tower's width and depth changed."""
    config = build.model_config(vocab_size=512, vision_width=vision_width)  # LM unused
    config["vision_config"]["num_hidden_layers"] = vision_layers
    return config


def train(
    config: dict,
    parameters: dict[str, mx.array],
    kinds: Sequence[str] = ("shape",),
    steps: int = 1300,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    warmup: int = 100,
    train_pictures: int = 12000,
    valid_pictures: int = 400,
    report_every: int = 100,
    seed: int = 0,
    log: Callable[[str], None] = print,
    repeats: Mapping[str, int] | None = None,
    group: mx.distributed.Group | None = None,
    center: Sequence[str] = (),
    classifier_steps: int = 0,
    classifier_rate: float = 1e-2,
) -> tuple[dict[str, mx.array], list[tuple[int, dict[str, float]]]]:
    """Train the tower and projector of the model `config` from `parameters` with the probe's
    classifiers, on the "train" split's pictures that answer `kinds` (those that answer a kind
    in `repeats` drawn that many times as often). Returns the trained tower's and projector's
    parameters (under the model's names) and, at every report, the held-out accuracy of each
    kind ("valid" split).

    Under `mlx.launch` (`group`, by default MLX's own, of more than one process) every process
    draws the same pictures, computes the loss and gradients of its share of them and the
    validation of its share of the held-out batches, and the sums are added across processes:
    the steps of one process on the whole batch, in a fraction of the time (MLX's CPU backend
    computes a step on one core). Only the first process logs.

    With `classifier_steps`, the classifiers are first fitted alone for that many steps (at
    `classifier_rate`), the tower and projector frozen, on the mean tokens of FITTING_BATCHES
    steps' pictures, made once: trained through classifiers still at their random weights, the
    tower follows their noise for hundreds of steps (AdamW moves each weight by about the rate,
    whatever the gradient). Fitted first, they tell it something from the start: the stages
    mostly learned sooner, and the whole model answered more (docs/shapes.md, runs lp300)."""
    from ..batch_cli import all_sum_ints
    from ..config import ModelConfig
    from ..image_processor import ImageProcessor, ImageProcessorSettings
    from ..models.lfm2_vl import Lfm2VlModel
    from ..train import shares

    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"kinds {unknown or kinds} are not among {', '.join(KINDS)}")
    group = group or mx.distributed.init()
    rank, size = group.rank(), group.size()
    if batch_size < size:
        raise ValueError(f"a step of {batch_size} pictures cannot be shared by {size} processes")
    model = Lfm2VlModel(ModelConfig.from_dict(config))
    model.load_weights(list(parameters.items()))
    probe = Probe(model, kinds, seed, center)
    processor = ImageProcessor(ImageProcessorSettings.from_dict({**build.PROCESSOR, "resample": 3}))

    pool = repeated(pictures(kinds, "train", train_pictures), repeats or {})
    valid = [
        Batch.pack(processor, chunk)
        for chunk in _chunks(pictures(kinds, "valid", valid_pictures), batch_size)[rank::size]
    ]

    def loss(model: Probe, batch: Batch, answered: int) -> mx.array:
        """The summed cross-entropy of this process's pictures over the answers of the whole
        step's (`answered`): the processes' shares add up to the step's mean."""
        logits = model(batch, group)
        total = mx.array(0.0)
        for kind in logits:
            rows, answers = batch.answers(kind)
            if rows:
                chosen = logits[kind][mx.array(rows)]
                total = total + nn.losses.cross_entropy(chosen, mx.array(answers)).sum()
        return total / answered

    def accuracy() -> dict[str, float]:
        right, asked = [0] * len(kinds), [0] * len(kinds)
        for batch in valid:
            logits = probe(batch)
            for k, kind in enumerate(kinds):
                rows, answers = batch.answers(kind)
                if rows:
                    guesses = logits[kind][mx.array(rows)].argmax(axis=1)
                    right[k] += int((guesses == mx.array(answers)).sum().item())
                    asked[k] += len(rows)
        summed = all_sum_ints(group, right + asked)  # every process's share of the pictures
        right, asked = summed[: len(kinds)], summed[len(kinds) :]
        return {kind: right[k] / asked[k] for k, kind in enumerate(kinds) if asked[k]}

    order = np.random.default_rng(seed)

    def next_batch() -> tuple[Batch, int]:
        """This process's share of the next step's pictures, and the step's answers in all."""
        drawn = [pool[i] for i in order.integers(len(pool), size=batch_size)]
        answered = sum(len(labels) for _, labels in drawn)
        mine = shares([_pixels(image, processor) for image, _ in drawn], size)[rank]
        batch = Batch.pack(processor, [drawn[i] for i in mine])
        batch.step_pictures = batch_size
        return batch, answered

    value_and_grad = nn.value_and_grad(probe, loss)

    def step(optimizer: optim.Optimizer, batch: Batch, answered: int) -> float:
        """One step of the probe's trainable parameters; the step's mean loss."""
        value, gradients = value_and_grad(probe, batch, answered)
        if size > 1:
            value = mx.distributed.all_sum(value, group=group)
            # average_gradients gathers small arrays into few messages; it divides by the size
            gradients = tree_map(lambda g: g * size, nn.average_gradients(gradients, group=group))
        optimizer.update(probe, gradients)
        mx.eval(probe.parameters(), optimizer.state)
        return value.item()

    def report(number: int, losses: list[float], what: str = "") -> None:
        history.append((number, accuracy()))
        kinds_line = ", ".join(f"{k} {v:.1%}" for k, v in history[-1][1].items())
        if rank == 0:
            log(f"step {number}/{steps}{what}: loss {np.mean(losses):.3f}, held-out {kinds_line}")

    history = []
    if classifier_steps:
        # the classifiers fitted on the mean tokens of FITTING_BATCHES steps' pictures, made
        # once by the frozen tower and gone over again and again
        fitting = [next_batch() for _ in range(FITTING_BATCHES)]
        for batch, _ in fitting:
            batch.means = probe.means(batch)
            mx.eval(batch.means)
        probe.vision_tower.freeze()
        probe.multi_modal_projector.freeze()
        adam = optim.Adam(learning_rate=classifier_rate)
        losses = [step(adam, *fitting[n % len(fitting)]) for n in range(classifier_steps)]
        probe.unfreeze()
        report(0, losses, f" (classifiers alone, {classifier_steps} steps)")
    rate = learning_rate
    if warmup:
        warm = optim.linear_schedule(learning_rate * 0.01, learning_rate, warmup)
        rate = optim.join_schedules([warm, lambda _: learning_rate], [warmup])
    optimizer = optim.AdamW(learning_rate=rate, weight_decay=0.0, bias_correction=True)
    losses = []
    for number in range(1, steps + 1):
        losses.append(step(optimizer, *next_batch()))
        if number % report_every == 0 or number == steps:
            report(number, losses)
            losses = []
    trained = {f"vision_tower.{k}": v for k, v in tree_flatten(probe.vision_tower.parameters())}
    projector = tree_flatten(probe.multi_modal_projector.parameters())
    trained.update({f"multi_modal_projector.{k}": v for k, v in projector})
    return trained, history


def _pixels(image: Image.Image, processor) -> int:
    """The pixels of the views the processor makes of `image`: what the tower's work grows with."""
    views = plan_image(image.height, image.width, processor.settings).view_shapes
    return sum(height * width for height, width in views)


def _chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kind", nargs="+", default=["shape"], choices=KINDS, help="questions to learn"
    )
    parser.add_argument(
        "--vision-width", type=int, default=build.VISION_WIDTH, help="(the build's: %(default)s)"
    )
    parser.add_argument("--vision-layers", type=int, default=4, help="(the build's: 4)")
    parser.add_argument("--steps", type=int, default=1300)
    parser.add_argument("--batch-size", type=int, default=16, help="pictures a step")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="steps of linear lr warm-up")
    parser.add_argument("--train-pictures", type=int, default=12000)
    parser.add_argument("--valid-pictures", type=int, default=400)
    parser.add_argument("--report-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--center",
        nargs="*",
        default=[],
        choices=KINDS,
        metavar="KIND",
        help="kinds whose classifiers read each picture's mean less the step's (none)",
    )
    parser.add_argument(
        "--classifier-steps",
        type=int,
        default=0,
        help="steps that first fit the classifiers alone, the tower frozen (%(default)s)",
    )
    parser.add_argument(
        "--repeats",
        nargs="*",
        default=[],
        type=build.vision_repeat,
        metavar="KIND:TIMES",
        help="draw the pictures of KIND TIMES as often (none)",
    )
    args = parser.parse_args(argv)
    for name in ("vision_layers", "steps", "batch_size", "train_pictures", "valid_pictures"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.classifier_steps < 0:
        parser.error("--classifier-steps must be 0 (none) or more")
    if args.vision_width < 2 or args.vision_width % 2:
        parser.error("--vision-width must be an even number: the tower has two attention heads")
    config = probe_config(args.vision_width, args.vision_layers)
    began = time.perf_counter()
    train(
        config,
        build.initial_parameters(config, args.seed),
        args.kind,
        args.steps,
        args.batch_size,
        args.learning_rate,
        args.warmup,
        args.train_pictures,
        args.valid_pictures,
        args.report_every,
        args.seed,
        log=lambda line: print(f"{line} ({time.perf_counter() - began:.0f} s)", flush=True),
        repeats=dict(args.repeats),
        center=args.center,
        classifier_steps=args.classifier_steps,
    )


if __name__ == "__main__":
    from .. import relaunch_with_fast_blas

    relaunch_with_fast_blas()  # on Linux: OpenBLAS preloaded, or float32 matmuls are ~50x slower
    main()
