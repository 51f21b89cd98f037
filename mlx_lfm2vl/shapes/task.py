"""The shapes task: pictures of coloured shapes and of written words, with questions about them.

Every example is a function of (split, index) alone, so a split is the same on every machine
with the same Pillow: an image of 1-3 equal shapes (circle, square or triangle) in one colour, or
of one of six words, and one question whose answer is a word or a number:

    colour    "What color is the shape?"          "red"        (or "... are the shapes?")
    shape     "Which shape is in the picture?"    "circle"
    count     "How many shapes are there?"        "3"
    position  "Where is the shape?"               "top left"   (one shape, in one quadrant)
    word      "What word is written?"             "fish"

Image sizes vary from 96 to 640 pixels a side, so small images are one view and large ones are
cut into tiles by the processor of the model trained on them (`build.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = (1, 2, 3)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
WORDS = ("cat", "sun", "fish", "moon", "tree", "key")
KINDS = ("color", "shape", "count", "position", "word")

# Each split draws from its own stream of seeds, so no example is in two splits. "warmup" is
# the easy start of training: lone shapes, large (colour, shape) or in a quadrant (position),
# and words.
SPLITS = {"train": 0, "valid": 1, "test": 2, "warmup": 3}
WARMUP_KINDS = ("color", "shape", "position", "word")
SIDES = (96, 640)  # smallest and largest side, pixels
SMALL_MAX = 220  # small images have sides of 96-220 pixels: the processor shows them whole
LARGE = 0.15  # share of images drawn large (sides of 400-640 pixels): the processor tiles those
# Shape radii, as fractions of the picture's shorter side. Several shapes always have the same
# size; a lone shape in a quadrant is a little larger; a lone shape elsewhere (colour and shape
# questions) ranges up to most of the picture, which makes the colour easy to see first: a
# model trained from scratch links the image to its answers only once something is that easy.
RADIUS_MANY = 0.12
RADIUS_ONE_IN_QUADRANT = (0.15, 0.2)
RADIUS_ONE = (0.15, 0.4)


@dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str
    kind: str
    # every question the picture answers, this one included: (kind, question, answer)
    questions: tuple[tuple[str, str, str], ...] = ()

    def messages(self) -> list[dict]:
        """This question and its answer in the processor's (and the trainer's) messages form."""
        return _conversation([(self.question, self.answer)])

    def all_messages(self, seed: int) -> list[dict]:
        """A conversation that asks every question the picture answers, in an order drawn from
        `seed`, the image in the first turn: what the model is trained on."""
        order = np.random.default_rng(seed).permutation(len(self.questions))
        return _conversation([self.questions[i][1:] for i in order])


def _conversation(turns: list[tuple[str, str]]) -> list[dict]:
    messages = []
    for number, (question, answer) in enumerate(turns):
        text = {"type": "text", "text": question}
        content = [{"type": "image"}, text] if number == 0 else [text]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages


def example(split: str, index: int) -> Example:
    """Example `index` of `split` ("train", "valid", "test" or "warmup")."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([SPLITS[split], index])
    kind = kind_of(split, index)
    size = _image_size(rng)
    if kind == "word":
        word = WORDS[rng.integers(len(WORDS))]
        questions = [("word", "What word is written?", word)]
        image = _word_image(rng, size, word)
    else:
        color = list(COLORS)[rng.integers(len(COLORS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        count = 1 if kind == "position" or split == "warmup" else int(rng.choice(COUNTS))
        # Counted shapes all have one size, so a count is also an area; a lone shape asked
        # about (colour, shape) ranges up to most of the picture.
        radius = (RADIUS_MANY, RADIUS_MANY) if count > 1 or kind == "count" else RADIUS_ONE
        if kind == "position":
            radius = RADIUS_ONE_IN_QUADRANT
        in_quadrant = count == 1 and kind in ("position", "count")
        image, quadrant = _shapes_image(rng, size, shape, COLORS[color], count, radius, in_quadrant)
        noun = "is the shape" if count == 1 else "are the shapes"
        questions = [
            ("color", f"What color {noun}?", color),
            ("shape", "Which shape is in the picture?", shape),
            ("count", "How many shapes are there?", str(count)),
        ]
        if quadrant:
            questions.append(("position", "Where is the shape?", quadrant))
    _, question, answer = next(q for q in questions if q[0] == kind)
    return Example(image, question, answer, kind, tuple(questions))


def kind_of(split: str, index: int) -> str:
    """The kind of question example `index` of `split` asks, without drawing it."""
    kinds = WARMUP_KINDS if split == "warmup" else KINDS
    return kinds[index % len(kinds)]  # every kind equally often, in every split


def answerable(kind: str) -> tuple[str, ...]:
    """The kinds of question a picture drawn for a question of `kind` can answer: a word's
    picture only its word; a picture of shapes its colour, shape, count and perhaps position."""
    return ("word",) if kind == "word" else ("color", "shape", "count", "position")


def examples(split: str, count: int, start: int = 0) -> Iterator[Example]:
    for index in range(start, start + count):
        yield example(split, index)


def write_split(folder: Path, split: str, count: int, every_question: bool = False) -> Path:
    """Write `count` examples of `split` as PNG files under `folder/images/` and a JSONL file of
    conversations (the trainer's data format) named after the split; returns that file. With
    `every_question`, each conversation asks all the questions its picture answers."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    file = folder / f"{split}.jsonl"
    with open(file, "w") as out:
        for index in range(count):
            item = example(split, index)
            name = f"images/{split}-{index:06d}.png"
            item.image.save(folder / name)
            messages = item.all_messages(seed=index) if every_question else item.messages()
            row = {"messages": messages, "images": [name]}
            out.write(json.dumps(row) + "\n")
    return file


# ------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    if rng.random() < LARGE:
        return int(rng.integers(400, SIDES[1] + 1)), int(rng.integers(400, SIDES[1] + 1))
    return int(rng.integers(SIDES[0], SMALL_MAX + 1)), int(rng.integers(SIDES[0], SMALL_MAX + 1))


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """White to light grey, never tinted: the shapes' colour is the only colour."""
    return Image.new("RGB", size, (int(rng.integers(225, 256)),) * 3)


def _shapes_image(
    rng: np.random.Generator,
    size: tuple[int, int],
    shape: str,
    color: tuple[int, int, int],
    count: int,
    radius: tuple[float, float],
    in_quadrant: bool,
) -> tuple[Image.Image, str]:
    """`count` equal shapes that do not touch, of a radius drawn from `radius` (fractions of
    the shorter side). A lone shape is drawn inside a quadrant (returned) when `in_quadrant`."""
    width, height = size
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    radius = side * rng.uniform(*radius)
    quadrant = ""
    centres: list[tuple[float, float]] = []
    if in_quadrant:
        q = int(rng.integers(4))
        quadrant = QUADRANTS[q]
        # Inside the quadrant and clear of the middle lines, so the answer is never ambiguous.
        x_lo, x_hi = (radius * 1.1, width / 2 - radius * 1.3)
        y_lo, y_hi = (radius * 1.1, height / 2 - radius * 1.3)
        x = rng.uniform(x_lo, max(x_lo, x_hi))
        y = rng.uniform(y_lo, max(y_lo, y_hi))
        centres.append((width - x if q % 2 else x, height - y if q >= 2 else y))
    else:
        for attempt in range(100_000):
            if len(centres) == count:
                break
            if attempt % 1000 == 999:  # too crowded: start again, smaller
                centres, radius = [], radius * 0.9
            x = rng.uniform(radius * 1.1, width - radius * 1.1)
            y = rng.uniform(radius * 1.1, height - radius * 1.1)
            if all(math.hypot(x - cx, y - cy) > 2.6 * radius for cx, cy in centres):
                centres.append((x, y))
    for x, y in centres:
        _draw_shape(draw, shape, x, y, radius, color)
    return image, quadrant


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, color):
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle((x - s, y - s, x + s, y + s), fill=color)
    elif shape == "triangle":
        draw.polygon(
            [(x, y - r), (x + r * 0.95, y + r * 0.75), (x - r * 0.95, y + r * 0.75)], color
        )
    else:  # cross
        t = r * 0.32
        draw.rectangle((x - r, y - t, x + r, y + t), fill=color)
        draw.rectangle((x - t, y - r, x + t, y + r), fill=color)


def _word_image(rng: np.random.Generator, size: tuple[int, int], word: str) -> Image.Image:
    """One word in dark ink, as large as a third to a half of the image's height allows."""
    width, height = size
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    font_size = int(min(height * rng.uniform(0.3, 0.45), width * 0.85 / (0.62 * len(word))))
    font = ImageFont.load_default(size=max(font_size, 12))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x = rng.uniform(0, max(1.0, width - (right - left))) - left
    y = rng.uniform(0, max(1.0, height - (bottom - top))) - top
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    draw.text((x, y), word, fill=ink, font=font)
    return image
