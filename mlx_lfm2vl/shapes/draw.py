"""Draw one picture of the shapes task and print its question and answer.

python -m mlx_lfm2vl.shapes.draw --index 3 --out shapes.png
"""

from __future__ import annotations

import argparse

from . import task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="test", choices=list(task.SPLITS))
    parser.add_argument("--index", type=int, default=0, help="which picture (default: 0)")
    parser.add_argument("--out", default="shapes.png", help="PNG file (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.index < 0:
        parser.error("--index must be 0 or more")
    item = task.example(args.split, args.index)
    item.image.save(args.out)
    width, height = item.image.size
    print(f"{args.out} ({width}x{height}): {item.question} -> {item.answer}")


if __name__ == "__main__":
    main()
