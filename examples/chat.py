"""A multi-turn chat in the terminal; images can join the conversation at any turn.

    python examples/chat.py --model LiquidAI/LFM2-VL-1.6B

Type a message and press Enter. `/image PATH` attaches an image to your next message (one that
cannot be read is refused at once), `/reset` starts over, `/quit` (or Ctrl-D) leaves. A message
that fails leaves the conversation as it was, and drops the images attached to it. Earlier
turns and images are not processed again: the `Chat` helper continues from a snapshot of the
model's cache.
"""

import argparse

from mlx_lfm2vl import Chat, Lfm2VlError, load, relaunch_with_fast_blas
from mlx_lfm2vl.image_processor import load_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="LiquidAI/LFM2-VL-450M")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args()

    try:
        model, processor = load(args.model)
    except Lfm2VlError as e:
        raise SystemExit(f"error: {e}") from None
    chat = Chat(model, processor, system=args.system, max_tokens=args.max_tokens)
    pending_images: list = []
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            chat.reset()
            pending_images = []
            continue
        if line.startswith("/image "):
            path = line.removeprefix("/image ").strip()
            try:
                # Decoded now: a bad path is reported here and never reaches a turn.
                pending_images.append(load_image(path))
            except Lfm2VlError as e:
                print(f"error: {e} (image not attached)")
            continue
        if not line:
            continue
        print("model> ", end="", flush=True)
        stats = None
        try:
            for chunk in chat.send(line, pending_images):
                print(chunk.text, end="", flush=True)
                stats = chunk.stats
        except Lfm2VlError as e:
            # The conversation is as it was before this message. Its images go too: one that
            # cannot be used would otherwise fail every later message.
            dropped = len(pending_images)
            note = f" (dropped the {dropped} attached image(s): /image to attach again)"
            print(f"\nerror: {e}{note if dropped else ''}")
            pending_images = []
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the answer (kept, as far as it got), not the chat
            pass
        pending_images = []
        print()
        if stats is not None:
            print(f"[{stats.prompt_tokens} new prompt tokens, {stats.generation_tps:.1f} tokens/s]")


if __name__ == "__main__":
    relaunch_with_fast_blas()  # Linux: restart once with a fast BLAS for MLX's CPU backend
    main()
