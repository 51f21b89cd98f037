"""Batched generation against the same requests one after another: throughput and latency.

Run by hand, never part of the test suite:

    LD_PRELOAD="$(python -m mlx_lfm2vl.cpu)" python benchmarks/bench_batch.py \\
        --model FOLDER [--tokens 64] [--concurrency 1 2 4 8 16]

The checkpoint is a random-weight model at the real LFM2-VL-450M shapes, stored in bf16 as
published (`benchmarks/bench_vs_mlx_vlm.py --build` makes one; or any LFM2-VL folder). The port
computes in float32 (its CPU default, the stored bf16 LM weights kept where the forwarder is).

Requests are short text prompts of different lengths (14-60 tokens), each decoding exactly
`--tokens` tokens greedily (end-of-sequence suppressed, so every run does the same work). For each
concurrency C:

- sequential: C requests one after another with `generate` (the baseline);
- burst: the same C requests submitted at once to a `BatchEngine` with C rows;
- staggered: C clients in a closed loop, each submitting its next request when its previous one
  ends, 2C requests in all, the clients' first requests spread evenly over one solo request's
  duration, so requests join a batch that is already decoding (as a server's do).

A burst's time to first token is bound by arithmetic wherever a prefill is (the CPU here): the
last of C requests that arrive at once waits for the prefills of the C - 1 before it, whatever
the order. The staggered runs show the engine's own cost for a request that joins.

Reported: aggregate decode tokens/s (tokens after each request's first, over the wall time of the
run after the first token), time to first token per request against its solo time (median and
worst ratio), and MLX's peak memory with its share per row.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mlx_lfm2vl import generate, load
from mlx_lfm2vl.batch import BatchEngine
from mlx_lfm2vl.sampling import suppress_tokens

WORDS = (
    "Describe the picture of a city street at night with cars people and bright shop windows "
    "then count the apples on the table and say what colour the cat on the mat is"
).split()


def prompt(i: int) -> str:
    """Prompts of 3 to 30 words (14 to ~60 tokens with the chat template), different per i."""
    n = 3 + (i * 7) % 28
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def options(processor, tokens: int) -> dict:
    return {
        "max_tokens": tokens,
        "temperature": 0.0,
        "logits_processors": [suppress_tokens(processor.eos_token_ids)],
    }


def sequential(model, processor, prompts: list[str], tokens: int) -> dict:
    ttft, decode_tokens, decode_time = [], 0, 0.0
    mx.reset_peak_memory()
    for text in prompts:
        result = generate(model, processor, text, **options(processor, tokens))
        ttft.append(result.stats.time_to_first_token)
        n = result.stats.generation_tokens
        decode_tokens += n - 1
        decode_time += (n - 1) / result.stats.generation_tps
    return {"ttft": ttft, "tps": decode_tokens / decode_time, "peak": mx.get_peak_memory()}


def batched(
    model, processor, prompts: list[str], tokens: int, rows: int, clients: int, spread: float = 0.0
) -> dict:
    """`clients` closed-loop clients over `prompts` (clients = len(prompts): a burst), client k
    starting `k * spread / clients` seconds after the first."""
    engine = BatchEngine(model, processor, max_rows=rows)
    queue = list(prompts)
    submitted: dict[int, float] = {}
    first: dict[int, float] = {}
    produced: dict[int, int] = {}

    def submit() -> None:
        start = time.perf_counter()  # preprocessing counts, as in generate's statistics
        request_id = engine.submit(queue.pop(0), **options(processor, tokens))
        submitted[request_id] = start

    mx.reset_peak_memory()
    begin = time.perf_counter()
    starts = [begin + k * spread / clients for k in range(min(clients, len(queue)))]
    start_decode = None
    while starts or engine.busy:
        while starts and starts[0] <= time.perf_counter():
            starts.pop(0)
            submit()
        if not engine.busy:
            time.sleep(max(0.0, starts[0] - time.perf_counter()))
            continue
        for request_id, chunk in engine.step():
            now = time.perf_counter()
            if request_id not in first:
                first[request_id] = now
                start_decode = start_decode or now
            produced[request_id] = produced.get(request_id, 0) + 1
            if chunk.finish_reason is not None and queue:
                submit()
    end = time.perf_counter()
    ttft = [first[i] - submitted[i] for i in sorted(submitted)]
    decode_tokens = sum(n - 1 for n in produced.values())
    return {"ttft": ttft, "tps": decode_tokens / (end - start_decode), "peak": mx.get_peak_memory()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="an LFM2-VL checkpoint folder")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args()

    model, processor = load(args.model)
    weights = str(model.language_model.embed_tokens.weight.dtype).split(".")[-1]
    # warm-up: compile the one-token step and the batch shapes' kernels once
    sequential(model, processor, [prompt(0)], 4)
    batched(model, processor, [prompt(1), prompt(2)], 4, 2, 2)
    solo = {}
    print(f"# {args.model.name}, {args.tokens} tokens per request, LM weights {weights}\n")
    print(
        "| C | sequential tok/s | burst tok/s | x | staggered tok/s | x | burst TTFT / solo "
        "(median, worst) | staggered TTFT / solo (median, worst) | peak MLX memory, per row |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        prompts = [prompt(i) for i in range(c)]
        base = sequential(model, processor, prompts, args.tokens)
        for text, t in zip(prompts, base["ttft"], strict=True):
            solo.setdefault(text, t)
        burst = batched(model, processor, prompts, args.tokens, c, c)
        loop_prompts = [prompt(i) for i in range(2 * c)]
        for text in loop_prompts:
            if text not in solo:
                solo[text] = sequential(model, processor, [text], 2)["ttft"][0]
        solo_request = statistics.median(base["ttft"]) + (args.tokens - 1) / base["tps"]
        staggered = batched(model, processor, loop_prompts, args.tokens, c, c, spread=solo_request)

        def ratios(run, texts):
            values = [t / solo[p] for t, p in zip(run["ttft"], texts, strict=True)]
            return f"{statistics.median(values):.2f}, {max(values):.2f}"

        per_row = (burst["peak"] - base["peak"]) / max(1, c - 1) / 2**20 if c > 1 else 0.0
        print(
            f"| {c} | {base['tps']:.1f} | {burst['tps']:.1f} | {burst['tps'] / base['tps']:.2f} "
            f"| {staggered['tps']:.1f} | {staggered['tps'] / base['tps']:.2f} "
            f"| {ratios(burst, prompts)} | {ratios(staggered, loop_prompts)} "
            f"| {burst['peak'] / 2**20:.0f} MiB, +{per_row:.1f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
