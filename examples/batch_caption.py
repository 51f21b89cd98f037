"""Caption every image in a folder with `batch_generate`; writes one JSON line per image.

    python examples/batch_caption.py photos/ captions.jsonl
    python examples/batch_caption.py photos/ captions.jsonl --prompt "List the objects." --greedy

The model is loaded once and the images are decoded together, several rows per step. Every
image is read before any is captioned, so an unreadable one stops the script; for large folders,
error rows, resuming and several machines, use the command line:
`python -m mlx_lfm2vl.batch --images photos/ --prompt "..." --output captions.jsonl`.
"""

import argparse
import json
from pathlib import Path

from mlx_lfm2vl import Lfm2VlError, load, relaunch_with_fast_blas
from mlx_lfm2vl.batch import batch_generate

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("output", type=Path, help="JSON lines file to write")
    parser.add_argument("--model", default="LiquidAI/LFM2-VL-450M")
    parser.add_argument("--prompt", default="Describe this image in one sentence.")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--greedy", action="store_true", help="temperature 0: same text every run")
    args = parser.parse_args()

    try:
        images = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as e:  # missing, not a folder, not readable
        raise SystemExit(
            f"error: cannot list {args.folder} ({e.strerror}): pass a folder of images"
        ) from None
    if not images:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.folder}")
    options = {"max_tokens": args.max_tokens}
    if args.greedy:
        options["temperature"] = 0.0
    try:
        model, processor = load(args.model)
        requests = [{"prompt": args.prompt, "images": [path]} for path in images]
        results = batch_generate(model, processor, requests, **options)
    except Lfm2VlError as e:  # names the request: "request 3: Cannot decode ..."
        raise SystemExit(f"error: {e}") from None

    with args.output.open("w") as out:
        for path, result in zip(images, results, strict=True):
            out.write(json.dumps({"image": str(path), "caption": result.text.strip()}) + "\n")
    tokens = sum(r.stats.generation_tokens for r in results)
    print(f"{len(images)} images -> {args.output} ({tokens} tokens)")


if __name__ == "__main__":
    relaunch_with_fast_blas()  # Linux: restart once with a fast BLAS for MLX's CPU backend
    main()
