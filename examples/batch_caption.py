"""Caption every image in a folder, with a progress bar; writes one JSON line per image.

    python examples/batch_caption.py photos/ captions.jsonl
    python examples/batch_caption.py photos/ captions.jsonl --prompt "List the objects." --greedy

The model is loaded once; images are processed one at a time. Unreadable files are reported in
the output (with an "error" field) and do not stop the batch.
"""

import argparse
import json
from pathlib import Path

import click

from mlx_lfm2vl import Lfm2VlError, generate, load, relaunch_with_fast_blas

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
    try:
        model, processor = load(args.model)
    except Lfm2VlError as e:
        raise SystemExit(f"error: {e}") from None
    options = {"max_tokens": args.max_tokens}
    if args.greedy:
        options["temperature"] = 0.0

    generated = seconds = 0.0
    with args.output.open("w") as out, click.progressbar(images, label="captioning") as bar:
        for path in bar:
            try:
                result = generate(model, processor, args.prompt, [path], **options)
            except Lfm2VlError as e:
                out.write(json.dumps({"image": str(path), "error": str(e)}) + "\n")
                continue
            out.write(json.dumps({"image": str(path), "caption": result.text.strip()}) + "\n")
            generated += result.stats.generation_tokens
            if result.stats.generation_tps:
                seconds += result.stats.generation_tokens / result.stats.generation_tps
    speed = f", {generated / seconds:.1f} tokens/s" if seconds else ""
    print(f"{len(images)} images -> {args.output}{speed}")


if __name__ == "__main__":
    relaunch_with_fast_blas()  # Linux: restart once with a fast BLAS for MLX's CPU backend
    main()
