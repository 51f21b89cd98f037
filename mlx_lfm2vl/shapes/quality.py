"""What each quantization recipe costs the shapes model, against its float weights.

    python -m mlx_lfm2vl.shapes.quality --count 500

For the float model and every recipe of the converter (`lm-4` is mlx-vlm's split: the language
side at 4 bits, the vision side float), over the first `count` test questions:
- exact match: answers equal to the expected ones; same answers: equal to the float model's,
  over all questions and over the decided ones: those where every token of the float answer,
  and its end of turn, wins by at least `MARGIN` logits. A model that answers a question at
  chance has near-equal logits
  for its candidates, and any change of the weights, even 8-bit rounding, can flip such a tie;
- KL(float || quantized) and top-1 agreement of the next-token distributions where the float
  model's greedy answer is read out (every answer token and the end of the turn);
- cosine of the image embeddings (the projector's output), mean over image tokens;
- the size of the weights on disk.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import MODEL, task
from .evaluate import accuracy

# Logits by which each of the float model's answer tokens (and its end of turn) must beat the
# runner-up for a question to count as decided. Every token, not the first alone: "top left"
# and "top right" share a first token the model may be sure of while it is not of the second
# (test question 438 to run t1000's model: 6.1 logits, then 0.2). The margin is well above what
# 8-bit weights moved a logit of an earlier shapes model in float32 (at most 0.05 over its 500
# test questions), and above what bf16 compute moves it (a 4-bit model computing in bf16
# flipped an answer won by 0.1; docs/quantization.md).
MARGIN = 1.0


@dataclass(frozen=True)
class Quality:
    name: str
    exact_match: float
    same_answers: float  # share of answers equal to the float model's
    same_decided: float  # the same, over the questions the float model decides (`MARGIN`)
    decided: float  # share of the questions the float model decides
    kl: float  # nats, mean over answer positions
    top1: float
    cosine: float
    bytes: int


@dataclass
class _Readout:
    log_probs: list[mx.array]  # per question: (answer positions, vocab)
    embeddings: list[mx.array]  # per question: (image tokens, hidden)


def distribution_agreement(log_p: mx.array, log_q: mx.array) -> tuple[float, float]:
    """Mean KL(p || q) and top-1 agreement of two models' next-token log-probabilities at the
    same positions, (positions, vocab) each. (tests/test_quantization_accuracy.py uses these
    measures too.)"""
    kl = mx.mean(mx.sum(mx.exp(log_p) * (log_p - log_q), axis=-1)).item()
    top1 = mx.mean(mx.argmax(log_p, -1) == mx.argmax(log_q, -1)).item()
    return kl, top1


def mean_cosine(a: mx.array, b: mx.array) -> float:
    """Cosine similarity of two (tokens, hidden) embeddings, mean over the tokens, in float32."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    cosine = mx.sum(a * b, -1) / (mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1))
    return mx.mean(cosine).item()


def mean_agreement(
    log_probs: list[mx.array],
    other_log_probs: list[mx.array],
    embeddings: list[mx.array],
    other_embeddings: list[mx.array],
) -> tuple[float, float, float]:
    """KL, top-1 agreement and image-embedding cosine of two models' outputs on the same
    questions (`distribution_agreement`, `mean_cosine` per question), each a mean over them."""
    kl, top1, cosine = [], [], []
    for lp, lq, ea, eb in zip(
        log_probs, other_log_probs, embeddings, other_embeddings, strict=True
    ):
        divergence, agreement = distribution_agreement(lp, lq)
        kl.append(divergence)
        top1.append(agreement)
        cosine.append(mean_cosine(ea, eb))
    return float(np.mean(kl)), float(np.mean(top1)), float(np.mean(cosine))


def _readout(model, processor, items, answers: list[list[int]]) -> _Readout:
    log_probs, embeddings = [], []
    for item, answer in zip(items, answers, strict=True):
        inputs = processor(item.messages()[:1], images=[item.image])
        features = model.get_image_features(inputs["pixel_values"], inputs["spatial_shapes"])
        ids = mx.concatenate([inputs["input_ids"], mx.array([answer[:-1]], mx.int32)], axis=1)
        embeds = model.get_input_embeddings(ids, image_features=features)
        hidden = model.language_model(embeds)
        start = inputs["input_ids"].shape[1] - 1
        logits = model.lm_head_logits(hidden[0, start:]).astype(mx.float32)
        log_probs.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        embeddings.append(features.astype(mx.float32))
        mx.eval(log_probs[-1], embeddings[-1])
    return _Readout(log_probs, embeddings)


def closest_call(log_probs: mx.array) -> float:
    """The least margin, in logits, by which the top token beats the runner-up over the
    positions of `log_probs` (positions, vocab): how close the answer read out there came to
    another."""
    top2 = mx.topk(log_probs, 2, axis=-1)  # unordered: the margin is the absolute difference
    return float(mx.abs(top2[:, 1] - top2[:, 0]).min())


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(
    model_folder: str | Path, recipes: list[str] | None = None, count: int = 500, work=None
) -> list[Quality]:
    """The float model's row, then one row per recipe (default: every recipe)."""
    from .. import load
    from ..convert import RECIPES, convert

    model_folder = Path(model_folder)
    items = list(task.examples("test", count))
    base, processor = load(model_folder)
    base_scores = accuracy(base, processor, "test", count)
    answers = base_scores.tokens
    reference = _readout(base, processor, items, answers)
    decided = np.array([closest_call(log_probs) >= MARGIN for log_probs in reference.log_probs])
    rows = [
        Quality(
            "float", base_scores.exact_match, 1.0, 1.0, float(decided.mean()), 0.0, 1.0, 1.0,
            _size(model_folder),
        )
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        for recipe in recipes or list(RECIPES):
            folder = Path(scratch) / recipe
            convert(model_folder, folder, quantize=True, q_recipe=recipe)
            model, _ = load(folder)
            scores = accuracy(model, processor, "test", count)
            readout = _readout(model, processor, items, answers)
            kl, top1, cosine = mean_agreement(
                reference.log_probs, readout.log_probs, reference.embeddings, readout.embeddings
            )
            pairs = zip(scores.answers, base_scores.answers, strict=True)
            same = np.array([a == b for a, b in pairs])
            rows.append(
                Quality(
                    recipe,
                    scores.exact_match,
                    float(same.mean()),
                    float(same[decided].mean()),
                    float(decided.mean()),
                    kl,
                    top1,
                    cosine,
                    _size(folder),
                )
            )
            del model
    return rows


def table(rows: list[Quality]) -> str:
    lines = [
        "| weights | exact match | same answers as float: all | decided | KL (nats) | top-1 "
        "| image cosine | size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.exact_match:.1%} | {r.same_answers:.1%} | {r.same_decided:.1%} | "
            f"{r.kl:.2e} | {r.top1:.3f} | {r.cosine:.4f} | {r.bytes / 2**20:.2f} MiB |"
        )
    decided = rows[0].decided
    lines.append(f"\n(decided: {decided:.0%} of the questions, by {MARGIN} logits or more)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(MODEL), help="model folder (default: %(default)s)")
    parser.add_argument("--count", type=int, default=500, help="questions (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    print(table(measure(args.model, count=args.count)))


if __name__ == "__main__":
    from .. import relaunch_with_fast_blas

    relaunch_with_fast_blas()  # on Linux: OpenBLAS preloaded, or float32 matmuls are ~50x slower
    main()
