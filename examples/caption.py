"""Caption one image, streaming the text as it is written.

python examples/caption.py photo.jpg
python examples/caption.py photo.jpg --model /path/to/LFM2-VL-1.6B --prompt "What breed is it?"
"""

import argparse

from mlx_lfm2vl import Lfm2VlError, load, relaunch_with_fast_blas, stream_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="image file or http(s) URL")
    parser.add_argument("--model", default="LiquidAI/LFM2-VL-450M")
    parser.add_argument("--prompt", default="Describe this image in one sentence.")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    try:
        model, processor = load(args.model)
        chunks = stream_generate(
            model, processor, args.prompt, images=[args.image], max_tokens=args.max_tokens
        )
        for chunk in chunks:
            print(chunk.text, end="", flush=True)
    except Lfm2VlError as e:
        raise SystemExit(f"error: {e}") from None
    print()
    stats = chunk.stats
    print(
        f"[{stats.prompt_tokens} prompt tokens ({stats.image_tokens} image), "
        f"first token after {stats.time_to_first_token:.2f} s, "
        f"{stats.generation_tps:.1f} tokens/s]"
    )


if __name__ == "__main__":
    relaunch_with_fast_blas()  # Linux: restart once with a fast BLAS for MLX's CPU backend
    main()
