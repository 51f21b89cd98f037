"""The OpenAI-compatible server against the library alone on the same requests.

Run by hand on a quiet machine, never part of the test suite:

    LD_PRELOAD="$(python -m mlx_lfm2vl.cpu)" python benchmarks/bench_server.py \\
        --model FOLDER [--tokens 32] [--clients 1 4 8]

The checkpoint is any LFM2-VL folder (`benchmarks/bench_vs_mlx_vlm.py --build` makes a
random-weight one at the real 450M shapes). For each number of clients C, C closed-loop clients
send `--requests-per-client` short text requests each (greedy, `--tokens` tokens at most, the
prompts differ), streamed:

- library: a `BatchWorker` in this process (the engine the server runs, no HTTP);
- server: `python -m mlx_lfm2vl.server` in a subprocess on 127.0.0.1, through the `openai`
  client (JSON, server-sent events, the server's translation and prompt cache).

Both decode the same tokens (greedy, same rows), so the difference is the server's cost.
Both ask for log-probabilities, so every token reaches the client as a chunk (a random-weight
model's first tokens often decode to no text yet). Reported, medians over `--rounds`
interleaved rounds: requests/s, time to first token (send to the first token's chunk, median),
the mean latency of a request, and the server's overhead per request (its mean latency minus
the library's).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from mlx_lfm2vl import load
from mlx_lfm2vl.batch import BatchWorker, PromptCache
from mlx_lfm2vl.server import DEFAULT_PROMPT_CACHE_MB

WORDS = (
    "Describe the picture of a city street at night with cars people and bright shop windows "
    "then count the apples on the table and say what colour the cat on the mat is"
).split()
MAX_ROWS = 8


def prompt(i: int) -> str:
    n = 3 + (i * 7) % 28
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) + f" ({i})"


def closed_loop(one, prompts: list[str], clients: int) -> dict:
    """`clients` threads, each sending the next prompt when its last one is answered; `one(p)`
    returns (time to first text, latency)."""
    queue = list(prompts)
    lock = threading.Lock()
    results = []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                text = queue.pop(0)
            results.append(one(text))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {
        "rps": len(prompts) / wall,
        "ttft": statistics.median(r[0] for r in results),
        "latency": statistics.mean(r[1] for r in results),
    }


def median_of(rounds: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def library_request(worker: BatchWorker, tokens: int):
    def one(text: str) -> tuple[float, float]:
        start = time.perf_counter()
        first = None
        for chunk in worker.submit(text, max_tokens=tokens, temperature=0.0, logprobs=True):
            if first is None and chunk.token is not None:
                first = time.perf_counter() - start
        return first or time.perf_counter() - start, time.perf_counter() - start

    return one


def server_request(client, model: str, tokens: int):
    def one(text: str) -> tuple[float, float]:
        start = time.perf_counter()
        first = None
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": text}],
            max_tokens=tokens,
            temperature=0,
            logprobs=True,
            stream=True,
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].logprobs:
                first = time.perf_counter() - start
        return first or time.perf_counter() - start, time.perf_counter() - start

    return one


def start_server(model: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlx_lfm2vl.server", "--model", str(model)]
    command += ["--port", str(port), "--max-rows", str(MAX_ROWS), "--log-level", "warning"]
    process = subprocess.Popen(command, env=os.environ.copy())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="an LFM2-VL checkpoint folder")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import openai

    # Every request of every round is a new prompt: the server's prompt cache, which the
    # library's worker has too, then reuses only the chat template's opening, for both alike.
    runs = {
        (r, c): [prompt(100000 * r + 1000 * c + i) for i in range(c * args.requests_per_client)]
        for r in range(args.rounds)
        for c in args.clients
    }
    library: dict[int, list[dict]] = {c: [] for c in args.clients}
    server: dict[int, list[dict]] = {c: [] for c in args.clients}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = start_server(args.model, port)
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0
        )
        by_server = server_request(client, str(args.model), args.tokens)
        model, processor = load(args.model)
        cache = PromptCache(int(DEFAULT_PROMPT_CACHE_MB * (1 << 20)))
        with BatchWorker(model, processor, max_rows=MAX_ROWS, prompt_cache=cache) as worker:
            by_library = library_request(worker, args.tokens)
            for one in (by_library, by_server):  # warm-up
                closed_loop(one, [prompt(-1), prompt(-2)], 2)
            # Interleaved: each round runs every client count through both, so a slower
            # stretch of the machine falls on both alike.
            for (_, c), prompts in runs.items():
                library[c].append(closed_loop(by_library, prompts, c))
                server[c].append(closed_loop(by_server, prompts, c))
    finally:
        process.terminate()
        process.wait(timeout=60)

    print(f"# {args.model.name}: {args.tokens} tokens per request, streamed, greedy\n")
    print(
        "| clients | library req/s | server req/s | library TTFT | server TTFT "
        "| library latency | server latency | server overhead / request |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c in args.clients:
        lib, srv = median_of(library[c]), median_of(server[c])
        print(
            f"| {c} | {lib['rps']:.2f} | {srv['rps']:.2f} | {lib['ttft'] * 1e3:.0f} ms "
            f"| {srv['ttft'] * 1e3:.0f} ms | {lib['latency'] * 1e3:.0f} ms "
            f"| {srv['latency'] * 1e3:.0f} ms | {(srv['latency'] - lib['latency']) * 1e3:+.0f} ms |"
        )


if __name__ == "__main__":
    main()
