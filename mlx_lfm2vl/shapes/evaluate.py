"""How often a model answers the shapes task's questions exactly right.

    python -m mlx_lfm2vl.shapes.evaluate --model mlx_lfm2vl/shapes/model --count 500

An answer is right when the generated text, stripped of surrounding white space, equals the
expected answer. Questions are asked in batches (`batch_generate`), greedily.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field

from . import MODEL, task


@dataclass
class Accuracy:
    right: Counter = field(default_factory=Counter)  # by question kind
    asked: Counter = field(default_factory=Counter)
    answers: list[str] = field(default_factory=list)  # in question order
    tokens: list[list[int]] = field(default_factory=list)  # the answers' tokens, end included

    @property
    def exact_match(self) -> float:
        return sum(self.right.values()) / max(sum(self.asked.values()), 1)

    def by_kind(self) -> dict[str, float]:
        return {
            kind: self.right[kind] / self.asked[kind] for kind in task.KINDS if self.asked[kind]
        }


def answer_requests(items: list[task.Example]) -> list[dict]:
    """The `batch_generate` requests that ask `items`' questions, answered greedily (without
    `temperature`, generation samples at the checkpoint's default)."""
    return [
        {"prompt": item.messages()[:1], "images": [item.image], "max_tokens": 8, "temperature": 0}
        for item in items
    ]


def accuracy(model, processor, split: str = "test", count: int = 500, max_rows: int = 16):
    """Exact-match accuracy of `model` on the first `count` questions of `split`."""
    from ..batch import batch_generate

    result = Accuracy()
    for start in range(0, count, 64):
        items = list(task.examples(split, min(64, count - start), start))
        answers = batch_generate(model, processor, answer_requests(items), max_rows=max_rows)
        for item, answer in zip(items, answers, strict=True):
            text = answer.text.strip()
            result.answers.append(text)
            result.tokens.append(list(answer.tokens))
            result.asked[item.kind] += 1
            result.right[item.kind] += text == item.answer
    return result


def main(argv: list[str] | None = None) -> None:
    from .. import load

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(MODEL), help="model folder (default: %(default)s)")
    parser.add_argument("--split", default="test", choices=list(task.SPLITS))
    parser.add_argument("--count", type=int, default=500, help="questions (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    model, processor = load(args.model)
    result = accuracy(model, processor, args.split, args.count)
    kinds = ", ".join(f"{k} {v:.1%}" for k, v in result.by_kind().items())
    print(f"exact match {result.exact_match:.1%} on {args.count} {args.split} questions ({kinds})")


if __name__ == "__main__":
    from .. import relaunch_with_fast_blas

    relaunch_with_fast_blas()  # on Linux: OpenBLAS preloaded, or float32 matmuls are ~50x slower
    main()
