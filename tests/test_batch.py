"""Batched generation (`mlx_lfm2vl/batch.py`) against the same requests run alone.

Every row must be what its request gives alone: the same tokens and, step by step, the same
log-probabilities to float32 rounding (a matmul over several rows adds in another order). The
requests differ in length (text only, one small image, a tiled image), in sampling and in how
they end, so that padding or a neighbour's state leaking into a row would show.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from reference import random_image

import mlx_lfm2vl.batch
from mlx_lfm2vl import Lfm2VlError, generate, load, stream_generate
from mlx_lfm2vl.batch import BatchEngine, BatchWorker, PromptCache, batch_generate
from mlx_lfm2vl.cache import BatchKVCache, KVCache
from mlx_lfm2vl.errors import ContextLengthError
from mlx_lfm2vl.generate import prefill

# float32 rounding of the batched matmuls, relative to the logits' scale (~2 here)
LOGPROB_TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def loaded(checkpoint_16b):
    return load(checkpoint_16b)


def requests() -> list[dict]:
    return [
        {"prompt": "Describe this image.", "images": [random_image(256, 384, seed=1)]},
        {"prompt": "Hello, who are you? Tell me a long story about a cat and a mat."},
        {"prompt": "Count the apples.", "images": [random_image(600, 900, seed=2)]},
        {"prompt": "Hi", "max_tokens": 1},  # stops at once
        {"prompt": "Numbers: 1 2 3", "temperature": 1.0, "top_k": 50, "seed": 7},
        {"prompt": "What is 42?", "temperature": 0.7, "min_p": 0.1, "seed": 11, "stop": ["a"]},
    ]


def solo(model, processor, request: dict, **defaults) -> tuple[list[int], list[mx.array], str]:
    options = {**defaults, **request}
    prompt, images = options.pop("prompt"), options.pop("images", None)
    chunks = list(stream_generate(model, processor, prompt, images, **options))
    tokens = [c.token for c in chunks if c.token is not None]
    return tokens, [c.logprobs for c in chunks if c.token is not None], chunks[-1].finish_reason


def assert_rows_match_solo(model, processor, reqs, chunks_by_row, **defaults):
    for request, chunks in zip(reqs, chunks_by_row, strict=True):
        want_tokens, want_logprobs, want_finish = solo(model, processor, request, **defaults)
        tokens = [c.token for c in chunks if c.token is not None]
        assert tokens == want_tokens, (request["prompt"], tokens, want_tokens)
        assert chunks[-1].finish_reason == want_finish
        for step, (got, want) in enumerate(
            zip([c.logprobs for c in chunks if c.token is not None], want_logprobs, strict=True)
        ):
            got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
            finite = np.isfinite(want)
            error = np.abs(got[finite] - want[finite]).max()
            assert error <= LOGPROB_TOLERANCE, (request["prompt"], step, error)


def run_engine(engine: BatchEngine, ids: list[int]) -> list[list]:
    chunks = {i: [] for i in ids}
    while engine.busy:
        for request_id, chunk in engine.step():
            chunks[request_id].append(chunk)
    return [chunks[i] for i in ids]


def test_every_row_of_a_batch_is_what_its_request_gives_alone(loaded):
    model, processor = loaded
    reqs = requests()
    engine = BatchEngine(model, processor)
    ids = []
    for r in reqs:
        options = {"max_tokens": 10, "temperature": 0.0, **r}
        ids.append(engine.submit(options.pop("prompt"), options.pop("images", None), **options))
    chunks_by_row = run_engine(engine, ids)
    assert_rows_match_solo(model, processor, reqs, chunks_by_row, max_tokens=10, temperature=0.0)
    texts = ["".join(c.text for c in chunks) for chunks in chunks_by_row]
    assert texts == [
        generate(model, processor, **{"max_tokens": 10, "temperature": 0.0, **r}).text for r in reqs
    ]


def test_batch_generate_returns_results_in_request_order_like_generate(loaded):
    model, processor = loaded
    reqs = requests()[:4]
    results = batch_generate(model, processor, reqs, max_tokens=6, temperature=0.0)
    for request, result in zip(reqs, results, strict=True):
        alone = generate(model, processor, **{"max_tokens": 6, "temperature": 0.0, **request})
        assert (result.tokens, result.text, result.finish_reason) == (
            alone.tokens,
            alone.text,
            alone.finish_reason,
        )
        assert result.stats.prompt_tokens == alone.stats.prompt_tokens
        assert result.stats.image_tokens == alone.stats.image_tokens


def test_a_row_that_joins_midway_and_one_cancelled_midway_leave_the_others_unchanged(loaded):
    model, processor = loaded
    reqs = requests()
    options = {"max_tokens": 9, "temperature": 0.0}
    engine = BatchEngine(model, processor)
    first = [engine.submit(r["prompt"], r.get("images"), **options) for r in reqs[:2]]
    chunks = {i: [] for i in first}
    for _ in range(3):
        for request_id, chunk in engine.step():
            chunks[request_id].append(chunk)
    late = engine.submit(reqs[2]["prompt"], reqs[2]["images"], **options)  # a longer prompt
    cancelled = engine.submit("A row to cancel.", **options)
    chunks[late], chunks[cancelled] = [], []
    for step in range(20):
        if step == 2:
            engine.cancel(cancelled)
        for request_id, chunk in engine.step():
            chunks[request_id].append(chunk)
        if not engine.busy:
            break
    assert chunks[cancelled][-1].finish_reason == "cancelled"
    assert 1 <= len(chunks[cancelled]) <= 4
    assert_rows_match_solo(
        model, processor, reqs[:3], [chunks[i] for i in [*first, late]], **options
    )


def test_a_seeded_row_samples_the_same_tokens_whatever_its_neighbours(loaded):
    model, processor = loaded
    seeded = {"prompt": "Tell me about cats.", "temperature": 1.0, "seed": 5, "max_tokens": 12}
    alone = generate(model, processor, **seeded).tokens
    neighbours = [
        [],
        [{"prompt": "Other.", "temperature": 1.0, "seed": 1}],
        [{"prompt": "A picture.", "images": [random_image(300, 300, seed=3)]}, {"prompt": "x"}],
    ]
    for others in neighbours:
        results = batch_generate(model, processor, [*others, seeded], max_tokens=12)
        assert results[-1].tokens == alone


def test_rows_decoded_together_keep_their_own_caches_exactly(loaded):
    """What a row leaves in the batch cache equals what it leaves alone: no padding in a conv
    state, keys and values at the row's own positions, padding masked (compared after the
    batch shrank back to that one row)."""
    model, processor = loaded
    short = {"prompt": "Hi", "max_tokens": 5, "temperature": 0.0}
    long = {"prompt": "A much longer prompt that pads the short one.", "max_tokens": 2}
    engine = BatchEngine(model, processor)
    ids = [engine.submit(**short), engine.submit(**{**long, "temperature": 0.0})]
    tokens = {i: [] for i in ids}
    while not (len(tokens[ids[1]]) == 2 and len(engine._rows) == 1):
        assert engine.busy, tokens  # the short row must outlive the long one
        for request_id, chunk in engine.step():
            tokens[request_id].append(chunk.token)
    batch_cache = engine._cache  # the short row alone again, plain caches
    alone = model.make_cache()
    prompt = processor(short["prompt"])["input_ids"]
    model(prompt, cache=alone)
    for token in tokens[ids[0]][:-1]:
        model(mx.array([[token]]), cache=alone)
    for mine, theirs in zip(batch_cache, alone, strict=True):
        assert type(mine) is type(theirs)
        if isinstance(theirs, KVCache):  # positions; a conv state has none to check
            assert mine.offset == theirs.offset
        for a, b in zip(mine.state, theirs.state, strict=True):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


def test_left_padding_is_masked_and_each_row_keeps_its_position():
    rows = []
    for length in (3, 5):
        cache = KVCache()
        keys = mx.ones((1, 2, length, 4))
        cache.update_and_fetch(keys, keys)
        rows.append(cache)
    batch = BatchKVCache.from_rows(rows)
    assert batch.left == [2, 0] and batch.offset.tolist() == [3, 5]
    mask = batch.make_mask(1)
    assert mask.shape == (2, 1, 1, 6)
    assert mask[0, 0, 0].tolist() == [False, False, True, True, True, True]
    assert mask[1, 0, 0].tolist() == [True] * 6
    batch.keep([0])
    assert batch.left == [0] and batch.length == 3


def test_tiles_of_requests_admitted_together_run_through_the_vision_tower_as_one_batch(
    loaded, monkeypatch
):
    model, processor = loaded
    calls = []
    vision = type(model.vision_tower).__call__

    def recording(self, patches, height, width):
        calls.append((patches.shape[0], height, width))
        return vision(self, patches, height, width)

    monkeypatch.setattr(type(model.vision_tower), "__call__", recording)
    images = [random_image(600, 900, seed=2), random_image(700, 1000, seed=4)]
    reqs = [{"prompt": f"Image {i}.", "images": [image]} for i, image in enumerate(images)]
    batch_generate(model, processor, reqs, max_tokens=1, max_tiles=2)
    tiles = [count for count, h, w in calls if (h, w) == (32, 32)]
    assert tiles == [4], calls  # 2 tiles of each request, in one call


def test_bad_requests_are_refused_before_any_work(loaded):
    model, processor = loaded
    with pytest.raises(Lfm2VlError, match="request 1"):
        batch_generate(model, processor, [{"prompt": "ok"}, {"prompt": "x", "temperature": -1}])
    with pytest.raises(Lfm2VlError, match="no 'prompt'"):
        batch_generate(model, processor, [{"images": []}])
    engine = BatchEngine(model, processor)
    with pytest.raises(Lfm2VlError, match="max_tokens"):
        engine.submit("Hi", max_tokens=0)
    with pytest.raises(Lfm2VlError, match="marker"):
        engine.submit("<image> and <image>", [random_image(64, 64)])
    assert not engine.busy


def test_worker_streams_requests_from_several_threads_and_frees_a_closed_stream(loaded):
    model, processor = loaded
    reqs = requests()[:3]
    results: dict[int, list[int]] = {}
    with BatchWorker(model, processor, max_rows=4) as worker:

        def client(index: int) -> None:
            request = {"max_tokens": 8, "temperature": 0.0, **reqs[index]}
            prompt, images = request.pop("prompt"), request.pop("images", None)
            stream = worker.submit(prompt, images, **request)
            results[index] = [chunk.token for chunk in stream]

        abandoned = worker.submit("Leave me early.", max_tokens=10**6, temperature=0.0)
        next(abandoned)
        abandoned.close()  # cancels the request: its row is freed
        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 30
        while worker.engine.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not worker.engine.busy  # the abandoned request did not run on
    for index, request in enumerate(reqs):
        alone = generate(model, processor, **{"max_tokens": 8, "temperature": 0.0, **request})
        assert results[index] == alone.tokens


# ---------------------------------------------------------------- prompt reuse across requests


def recorded_prefills(monkeypatch) -> list[int]:
    """Lengths of the prompt pieces the engine prefills, as it runs them."""
    lengths = []

    def recording(model, input_ids, *args, **kwargs):
        lengths.append(input_ids.shape[1])
        return prefill(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(mlx_lfm2vl.batch, "prefill", recording)
    return lengths


def run_one(engine: BatchEngine, prompt, images=None, **options) -> list:
    request_id = engine.submit(prompt, images, **options)
    return run_engine(engine, [request_id])[0]


def test_a_conversation_resent_with_a_new_turn_prefills_only_that_turn_and_answers_as_cold(
    loaded, monkeypatch
):
    model, processor = loaded
    image = random_image(300, 400, seed=8)
    options = {"max_tokens": 6, "temperature": 0.0}
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    engine = BatchEngine(model, processor, prompt_cache=PromptCache(64 << 20))
    lengths = recorded_prefills(monkeypatch)
    answer = "".join(c.text for c in run_one(engine, first, [image], **options))
    assert len(engine.prompt_cache) == 1

    second = [
        *first,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Say more."},
    ]
    copy = random_image(300, 400, seed=8)  # the same pixels in a new object, as a client resends
    lengths.clear()
    vision_calls = []
    vision = type(model.vision_tower).__call__
    monkeypatch.setattr(
        type(model.vision_tower),
        "__call__",
        lambda self, *a: vision_calls.append(a) or vision(self, *a),
    )
    chunks = run_one(engine, second, [copy], **options)

    first_ids = processor.process(first, [image]).input_ids
    second_ids = processor.process(second, [image]).input_ids
    im_start = processor.tokenizer.token_to_id("<|im_start|>")
    reused = int(np.flatnonzero(first_ids == im_start)[-1]) + 1  # "assistant\n" follows it
    assert processor.decode(first_ids[reused:]) == "assistant\n"
    assert chunks[-1].stats.cached_tokens == reused
    assert sum(lengths) == len(second_ids) - reused  # only the new turn is prefilled
    assert vision_calls == []  # nor is the image encoded again
    cold = solo(model, processor, {"prompt": second, "images": [image]}, **options)
    assert [c.token for c in chunks] == cold[0]
    for got, want in zip([c.logprobs for c in chunks], cold[1], strict=True):
        assert np.abs(np.array(got) - np.array(want)).max() <= LOGPROB_TOLERANCE


def test_a_prefix_with_another_picture_or_other_image_settings_is_not_reused(loaded):
    model, processor = loaded
    engine = BatchEngine(model, processor, prompt_cache=PromptCache(64 << 20))
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    options = {"max_tokens": 1, "temperature": 0.0}
    run_one(engine, prompt, [random_image(64, 64, seed=1)], **options)
    again = run_one(engine, prompt, [random_image(64, 64, seed=1)], **options)
    other = run_one(engine, prompt, [random_image(64, 64, seed=2)], **options)
    smaller = run_one(
        engine, prompt, [random_image(64, 64, seed=1)], min_image_tokens=16, **options
    )
    assert again[-1].stats.cached_tokens > 0
    assert other[-1].stats.cached_tokens == 0
    assert smaller[-1].stats.cached_tokens == 0


def test_the_prompt_cache_keeps_compact_snapshots_and_drops_the_least_recently_used(loaded):
    model, processor = loaded
    prompts = ["First prompt.", "Second prompt.", "Third prompt."]
    ids = [processor.process(p).input_ids for p in prompts]
    caches = []
    for prompt_ids in ids:
        cache = model.make_cache()
        prefill(model, mx.array(prompt_ids)[None], cache=cache)
        caches.append(cache)
    one = PromptCache(1 << 30)
    one.store(ids[0], (), caches[0])
    size = one.nbytes
    kv = [c for c in caches[0] if isinstance(c, KVCache)]
    assert size == sum(a.nbytes for c in caches[0] for a in c.state)  # no spare capacity
    assert kv and kv[0].keys.shape[2] > kv[0].offset  # which the live cache has

    cache = PromptCache(int(2.5 * size))
    cache.store(ids[0], (), caches[0])
    cache.store(ids[1], (), caches[1])
    longer = np.concatenate([ids[0], [5, 6]])
    assert cache.lookup(longer, ())[0] == len(ids[0])  # the first is now the most recent
    cache.store(ids[2], (), caches[2])
    assert len(cache) == 2 and cache.nbytes <= 2.5 * size
    assert cache.lookup(np.concatenate([ids[1], [5]]), ()) is None
    assert cache.lookup(longer, ()) is not None
    assert cache.lookup(ids[0], ()) is None  # a prefix is reused only for a longer prompt


def test_a_context_length_refuses_prompts_without_room_and_ends_answers_at_it(loaded):
    model, processor = loaded
    prompt_tokens = len(processor.process("Hello there").input_ids)
    engine = BatchEngine(model, processor, context_length=prompt_tokens + 2)
    chunks = run_one(engine, "Hello there", max_tokens=50, temperature=0.0)
    assert len(chunks) == 2 and chunks[-1].finish_reason == "length"
    with pytest.raises(ContextLengthError, match="context of"):
        engine.submit("Hello there, a longer prompt", max_tokens=50)
    assert issubclass(ContextLengthError, Lfm2VlError)


# ---------------------------------------------------------------- the worker's streams


def test_a_stream_closed_before_its_first_chunk_frees_its_row(loaded):
    model, processor = loaded
    with BatchWorker(model, processor) as worker:
        stream = worker.submit("Never read.", max_tokens=10**6, temperature=0.0)
        stream.close()
        deadline = time.monotonic() + 30
        while worker.engine.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not worker.engine.busy
        assert list(stream) == []


def test_streams_can_be_awaited_and_carry_logprobs_computed_on_the_worker_thread(loaded):
    model, processor = loaded
    request = {"prompt": "Numbers: 1 2 3", "max_tokens": 5, "temperature": 0.0}
    want_tokens, want_logprobs, _ = solo(model, processor, request)

    async def client(worker: BatchWorker) -> list:
        stream = worker.submit(request["prompt"], logprobs=True, max_tokens=5, temperature=0.0)
        return [chunk async for chunk in stream]

    with BatchWorker(model, processor) as worker:
        chunks = asyncio.run(client(worker))
    assert [c.token for c in chunks] == want_tokens
    for chunk, want in zip(chunks, want_logprobs, strict=True):
        got = np.asarray(chunk.logprobs)  # already computed: no MLX work on this thread
        assert np.abs(got - np.array(want)).max() <= LOGPROB_TOLERANCE


# Runs in a fresh process: a BatchWorker answers, closes, and the interpreter exits.
_WORKER_EXIT = r"""
import sys
from mlx_lfm2vl import load
from mlx_lfm2vl.batch import BatchWorker

model, processor = load(sys.argv[1])
with BatchWorker(model, processor) as worker:
    chunks = list(worker.submit("Hello there", max_tokens=3, temperature=0.0))
print(len(chunks))
"""


def test_a_process_that_used_a_batch_worker_exits_cleanly(checkpoint_450m, tmp_path):
    # MLX 0.32 tears down the streams of a thread that ended without `mx.clear_streams()` at
    # interpreter exit, which aborted ~4 runs in 5 here ("terminate called without an active
    # exception", exit 134). Three runs: one abort fails the test.
    script = tmp_path / "worker_exit.py"
    script.write_text(_WORKER_EXIT)
    for _ in range(3):
        run = subprocess.run(
            [sys.executable, str(script), str(checkpoint_450m)], capture_output=True, text=True
        )
        assert run.returncode == 0 and run.stdout.strip() == "3", run.stderr[-2000:]
