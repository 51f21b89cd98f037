"""Quantization measured where it means something: on the trained shapes model.

Random-weight checkpoints (tests/test_quantization_accuracy.py) have flat next-token
distributions and no trained structure; the shapes model answers questions right, so a recipe's
cost shows as answers lost. For every recipe of the converter (`lm-4` is mlx-vlm's split) this
converts the model as a user would, loads the folder and asks the held-out test questions;
`mlx_lfm2vl.shapes.quality` computes the measures (and prints the table docs/quantization.md
shows, over 500 questions). The bounds hold with room for the Metal path's bf16 compute.

"Same answers" is asserted over the questions the float model decides (`quality.MARGIN`, on
every token of its answer): where the shapes model is unsure (some counts and words, the second
word of some positions), its candidates' logits can be close enough for any rounding to flip
the answer. Over all questions, 8 bits computing in float32 must keep 99% of the answers, as
issue 19 asks (measured: all of them).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_lfm2vl.convert import DEFAULT_RECIPE, RECIPES
from mlx_lfm2vl.shapes import MODEL
from mlx_lfm2vl.shapes.quality import closest_call, measure, table

QUESTIONS = 200
# The Metal path emulated on MLX's CPU runs bf16 and bf16-scaled quantized matmuls, which the CPU
# computes slowly (8 minutes for one recipe's 200 questions on the 2-core development machine):
# there the test checks the code path on the first 25 questions (5 of each kind).
QUESTIONS_EMULATED = 25

# recipe: (min exact match, min same answers on decided questions, max KL, min top-1,
# min image cosine), computing in float32 (the CPU path). Measured over these 200 questions
# (docs/quantization.md has the 500): exact match 97.0-97.5% (float 97.5%), every decided answer
# kept, KL 5.8e-6 (uniform-8), 1.4e-4 (mixed-4), 1.6e-4 (lm-4), 2.0e-3 (uniform-4), top-1
# 0.998-1, image cosine 0.9950 (uniform-4, its tower at 4 bits) to 1.
BOUNDS = {
    "uniform-8": (0.93, 0.99, 2e-5, 0.98, 0.9995),
    "mixed-4": (0.93, 0.99, 5e-4, 0.95, 0.9995),
    "lm-4": (0.93, 0.99, 5e-4, 0.95, 0.9995),
    "uniform-4": (0.93, 0.99, 6e-3, 0.93, 0.99),
}
SAME_ANSWERS_8BIT = 0.99  # over all the questions, computing in float32 (issue 19)
# Computing in bf16 (the Metal path), the float model and each quantized one round differently
# at every operation, and that noise dominates: over 25 questions, KL 2.6e-4 for uniform-8 (the
# noise alone, nearly), 2.4e-4 (lm-4), 5.8e-4 (mixed-4) and 2.7e-3 (uniform-4), top-1 0.98-1,
# exact match 96-100% (float 100%), image cosine 0.9946 (uniform-4) to 1, every decided answer
# kept.
BOUNDS_BF16 = {
    "uniform-8": (0.88, 0.99, 2e-3, 0.9, 0.999),
    "mixed-4": (0.88, 0.99, 3e-3, 0.9, 0.999),
    "lm-4": (0.88, 0.99, 3e-3, 0.9, 0.999),
    "uniform-4": (0.88, 0.99, 8e-3, 0.9, 0.99),
}


@pytest.fixture(scope="module")
def quality(tmp_path_factory, code_path):
    emulated = code_path == "metal" and mx.default_device() == mx.cpu
    count = QUESTIONS_EMULATED if emulated else QUESTIONS
    rows = measure(MODEL, count=count, work=tmp_path_factory.mktemp("quantized"))
    print("\n" + table(rows))
    return {row.name: row for row in rows}


@pytest.fixture(scope="module")
def bounds(shapes_dtype):
    return BOUNDS if shapes_dtype == mx.float32 else BOUNDS_BF16


@pytest.fixture(scope="module")
def shapes_dtype():
    """The dtype load() computes the shapes model in on this code path: its norms' (the CPU
    backend keeps the language model's matrices and embedding table in their stored bf16 and
    computes in float32, so their dtype does not tell)."""
    from mlx_lfm2vl import load

    model, _ = load(MODEL)
    return model.language_model.embedding_norm.weight.dtype


def test_a_question_is_decided_only_where_every_answer_token_is():
    """A position answered "top left" where "top right" was close: its first token won by 6.1
    logits, its second by 0.2 (test question 438 to the shipped model). It turns on the 0.2."""
    log_probs = mx.array([[-0.1, -6.2, -9.0], [-2.0, -1.8, -7.0], [-0.01, -12.0, -12.0]])
    assert closest_call(log_probs) == pytest.approx(0.2)
    assert closest_call(log_probs[:1]) == pytest.approx(6.1)


def test_every_recipe_is_measured(quality):
    assert set(BOUNDS) == set(BOUNDS_BF16) == set(RECIPES)
    assert set(quality) == {"float", *RECIPES}


@pytest.mark.parametrize("recipe", sorted(BOUNDS))
def test_recipe_keeps_the_answers(quality, bounds, recipe):
    row = quality[recipe]
    exact, same, kl, top1, cosine = bounds[recipe]
    assert row.exact_match >= exact, row
    assert row.same_decided >= same, row
    assert row.kl <= kl, row
    assert row.top1 >= top1, row
    assert row.cosine >= cosine, row
    assert row.bytes < quality["float"].bytes


def test_8bit_keeps_the_answers_to_the_test_questions(quality, shapes_dtype):
    """Issue 19: 8 bits keep the answers to at least 99% of the test questions. Computing in
    bf16, the rounding of each operation flips close calls of its own (measured: up to one of
    the 25 emulated questions), so there the bound is 90%."""
    bound = SAME_ANSWERS_8BIT if shapes_dtype == mx.float32 else 0.9
    assert quality["uniform-8"].same_answers >= bound, quality["uniform-8"]


def test_default_4bit_recipe_is_as_faithful_as_any_4bit_recipe_and_smaller(quality, shapes_dtype):
    """The default 4-bit recipe (mixed-4) moves the next-token distributions about as little as
    the least-moving 4-bit recipe, loses no more decided answers than any of them, and is
    smaller than the one as faithful (lm-4, mlx-vlm's split, whose vision side stays float).
    Computing in float32, within a quarter of the least KL: over these 200 questions 1.4e-4
    against lm-4's 1.6e-4 and uniform-4's 2.0e-3 (over 500, 1.58e-4 against 1.49e-4; on the
    models shipped before, 1.5-5x less than lm-4's). In bf16 compute each KL carries rounding
    noise of about uniform-8's KL, so two recipes' KL may differ by up to twice that (25
    questions: 5.8e-4 against lm-4's 2.4e-4, uniform-8 2.6e-4; 100 questions: 3.5e-4 against
    3.0e-4, uniform-8 2.0e-4)."""
    default = quality[DEFAULT_RECIPE[4]]
    others = [quality[name] for name in RECIPES if name not in ("uniform-8", DEFAULT_RECIPE[4])]
    if shapes_dtype == mx.float32:
        assert default.kl <= 1.25 * min(row.kl for row in others), others
    else:
        noise = quality["uniform-8"].kl
        assert default.kl <= min(row.kl for row in others) + 2 * noise, others
    assert default.same_decided >= max(row.same_decided for row in others)
    assert default.bytes < quality["lm-4"].bytes
