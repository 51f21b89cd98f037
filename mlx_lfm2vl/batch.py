"""Many requests decoded together: continuous batching, each row exactly what it would be alone.

A decode step is bound by reading the weights, so rows that share a step share that read: eight
rows cost little more than one. The engine:

- preprocesses a request when it is submitted (errors surface there, as `Lfm2VlError`);
- admits waiting requests while it has free rows: their images are encoded together (views of
  one shape from every new request in one batch: all 512x512 tiles at once), then each prompt
  runs alone through the language model into a cache of its own, exactly as `generate` runs it,
  and its first token is sampled;
- joins the new rows to the batch cache (`cache.BatchKVCache`, `cache.BatchConvCache`): rows are
  aligned on the right, each row's left padding is masked out of every softmax and never enters
  a conv state, and each row keeps its own positions for RoPE;
- decodes one token for every row at each step; a row leaves when its answer ends (end of
  sequence, stop string, max_tokens, cancelled) and a new one may take its place.

Each row samples with its own settings, logits processors and PRNG key, so a seeded request
gives the tokens it gives alone whatever its neighbours (up to float32 rounding of a matmul over
several rows: logits agree to ~1e-6).

`batch_generate` runs a list of requests to the end; `BatchEngine` is the step-by-step engine a
server drives; `BatchWorker` runs an engine on a thread of its own and streams each request's
chunks to whichever thread submitted it. The command line (`python -m mlx_lfm2vl.batch`) lives in
`batch_cli.py`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from .cache import BatchConvCache, BatchKVCache, ConvCache, KVCache
from .errors import Lfm2VlError
from .generate import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_STEP,
    Answer,
    GenerationChunk,
    GenerationResult,
    TokenSampler,
    _check_seed,
    _key,
    _stop_list,
    checkpoint_sampling,
    prefill,
)

if TYPE_CHECKING:
    from .models.lfm2_vl import Lfm2VlModel
    from .processor import ProcessedInputs, Processor

DEFAULT_MAX_ROWS = 16
_SAMPLING_OPTIONS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "repetition_context_size",
)
_REQUEST_OPTIONS = (*_SAMPLING_OPTIONS, "max_tokens", "seed", "stop", "logits_processors")


@dataclass
class _Row:
    """One request: its inputs, sampling and answer; `position` is its row in the batch."""

    id: int
    inputs: ProcessedInputs
    sample: TokenSampler
    answer: Answer
    last_token: mx.array | None = None
    cancelled: bool = False
    features: mx.array | None = field(default=None, repr=False)


class BatchEngine:
    """Requests in, chunks out, one `step()` at a time (not thread-safe but for `submit` and
    `cancel`, which may be called from any thread while one thread drives `step()`)."""

    def __init__(
        self,
        model: Lfm2VlModel,
        processor: Processor,
        max_rows: int = DEFAULT_MAX_ROWS,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
    ):
        if max_rows < 1:
            raise Lfm2VlError(f"max_rows must be at least 1, got {max_rows}")
        self.model, self.processor = model, processor
        self.max_rows = max_rows
        self.prefill_step_size = prefill_step_size
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._waiting: deque[_Row] = deque()
        self._cancelled: set[int] = set()
        self._rows: list[_Row] = []  # the batch, in row order
        # Per layer: the rows' caches; a single row keeps plain caches, so that it decodes as
        # fast as a request alone (the CPU backend compiles the one-row step).
        self._cache: list | None = None

    # ---------------------------------------------------------------- requests

    def submit(
        self,
        prompt: str | Sequence[dict[str, Any]],
        images: Any | Sequence[Any] | None = None,
        **options: Any,
    ) -> int:
        """Queue a request; returns its id. Options are `generate`'s: sampling (`temperature`,
        `top_p`, `top_k`, `min_p`, `repetition_penalty`, `repetition_context_size`), `seed`,
        `stop`, `max_tokens`, `logits_processors`, `json_schema` (the answer is JSON fitting
        it, see `stream_generate`), and image options for the processor. Bad input raises
        `Lfm2VlError` here, before the request is queued."""
        start_time = time.perf_counter()
        request = {k: options.pop(k) for k in _REQUEST_OPTIONS if k in options}
        json_schema = options.pop("json_schema", None)
        settings = checkpoint_sampling(self.processor).override(
            **{k: request.get(k) for k in _SAMPLING_OPTIONS}
        )
        sampler = settings.sampler()  # invalid values fail here
        processors = settings.logits_processors() + list(request.get("logits_processors", ()))
        if json_schema is not None:
            from .constrained import json_constraint  # imports llguidance only when used

            tokenizer, eos = self.processor.tokenizer, self.processor.eos_token_ids
            processors.append(json_constraint(tokenizer, eos, json_schema))
        max_tokens = request.get("max_tokens", DEFAULT_MAX_TOKENS)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise Lfm2VlError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        _check_seed(request.get("seed"))
        inputs = self.processor.process(prompt, images, **options)
        history = mx.array(inputs.input_ids, mx.int32) if processors else None
        image_tokens = int((inputs.input_ids == self.processor.image_token_id).sum())
        row = _Row(
            id=next(self._ids),
            inputs=inputs,
            sample=TokenSampler(sampler, processors, history, _key(request.get("seed"))),
            answer=Answer(
                self.processor.tokenizer,
                self.processor.eos_token_ids,
                _stop_list(request.get("stop")),
                max_tokens,
                prompt_tokens=len(inputs.input_ids),
                image_tokens=image_tokens,
                start_time=start_time,
            ),
        )
        with self._lock:
            self._waiting.append(row)
        return row.id

    def cancel(self, request_id: int) -> None:
        """End a request at the next step (its last chunk says "cancelled"); unknown or
        finished ids are ignored."""
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def busy(self) -> bool:
        """Whether requests are waiting or being decoded."""
        return bool(self._rows or self._waiting)

    # ---------------------------------------------------------------- the loop

    def step(self) -> list[tuple[int, GenerationChunk]]:
        """Admit waiting requests into free rows, then decode one token for every row: the
        chunks of this step, as (request id, chunk); a request's last chunk has its
        finish_reason set."""
        events: list[tuple[int, GenerationChunk]] = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [row for row in self._waiting if row.id not in cancelled]
            events += [
                (row.id, row.answer.cancelled()) for row in self._waiting if row.id in cancelled
            ]
            free = self.max_rows - len(self._rows)
            admitted, self._waiting = waiting[:free], deque(waiting[free:])
        for row in self._rows:
            row.cancelled = row.cancelled or row.id in cancelled
        if admitted:
            events += self._admit(admitted)
        if self._rows:
            events += self._decode()
        return events

    def _admit(self, rows: list[_Row]) -> list[tuple[int, GenerationChunk]]:
        self._encode_images(rows)
        events, joining = [], []
        for row in rows:
            row.answer.prefill_start = time.perf_counter()
            cache = self.model.make_cache()
            logits = prefill(
                self.model,
                mx.array(row.inputs.input_ids, mx.int32)[None],
                cache=cache,
                step_size=self.prefill_step_size,
                image_features=row.features,
            )
            row.features = None
            token, logprobs = row.sample(logits)
            chunk = row.answer.add(token.item(), logprobs[0], cancelled=row.cancelled)
            events.append((row.id, chunk))
            if chunk.finish_reason is None:
                row.last_token = token
                joining.append((row, cache))
        if joining:
            self._join([row for row, _ in joining], [cache for _, cache in joining])
        return events

    def _encode_images(self, rows: list[_Row]) -> None:
        """Image features of every new request, in one vision call: views of equal shape from
        all of them run as one batch (`Lfm2VlModel.get_image_features`)."""
        with_images = [row for row in rows if row.inputs.images is not None]
        if not with_images:
            return
        pixels = np.concatenate([row.inputs.images.pixel_values for row in with_images])
        shapes = np.concatenate([row.inputs.images.spatial_shapes for row in with_images])
        features = self.model.get_image_features(mx.array(pixels), mx.array(shapes))
        start = 0
        for row in with_images:
            count = sum(row.inputs.images.tokens_per_view)
            row.features = features[start : start + count]
            start += count

    def _join(self, rows: list[_Row], caches: list[list]) -> None:
        """Add rows, each with the cache its prompt ran into, to the batch."""
        layers = zip(*caches, strict=True)  # per layer: one cache per new row
        joined = [
            BatchKVCache.from_rows(list(per_row))
            if isinstance(per_row[0], KVCache)
            else BatchConvCache.from_rows(list(per_row))
            for per_row in layers
        ]
        if self._cache is None:
            self._cache = joined
        else:
            if len(self._rows) == 1:  # plain caches of a single row
                self._cache = [_as_batch(layer_cache) for layer_cache in self._cache]
            for mine, theirs in zip(self._cache, joined, strict=True):
                mine.extend(theirs)
        self._rows += rows
        if len(self._rows) == 1:
            self._cache = [layer_cache.single() for layer_cache in self._cache]

    def _decode(self) -> list[tuple[int, GenerationChunk]]:
        tokens = mx.concatenate([row.last_token for row in self._rows])[:, None]
        logits = self.model(tokens, cache=self._cache)[:, -1, :]
        samples = []
        for i, row in enumerate(self._rows):
            row.sample.append(row.last_token)
            samples.append(row.sample(logits[i : i + 1]))
        mx.eval([token for token, _ in samples])
        events, keep = [], []
        for i, (row, (token, logprobs)) in enumerate(zip(self._rows, samples, strict=True)):
            chunk = row.answer.add(token.item(), logprobs[0], cancelled=row.cancelled)
            events.append((row.id, chunk))
            row.last_token = token
            if chunk.finish_reason is None:
                keep.append(i)
        if len(keep) < len(self._rows):
            if not keep:
                self._cache = None
            else:
                for layer_cache in self._cache:
                    layer_cache.keep(keep)
                if len(keep) == 1:
                    self._cache = [layer_cache.single() for layer_cache in self._cache]
            self._rows = [self._rows[i] for i in keep]
        return events


def _as_batch(cache: KVCache | ConvCache) -> BatchKVCache | BatchConvCache:
    if isinstance(cache, KVCache):
        return BatchKVCache.from_rows([cache])
    return BatchConvCache.from_rows([cache])


def batch_generate(
    model: Lfm2VlModel,
    processor: Processor,
    requests: Sequence[dict[str, Any]],
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    **defaults: Any,
) -> list[GenerationResult]:
    """Answer many requests together; results in request order, each like `generate()`'s.

    Each request is a dict with `prompt` (a string or chat messages), optionally `images`, and
    any option of `generate` (sampling, `seed`, `stop`, `max_tokens`, image options);
    `defaults` apply to every request that does not set them. Every request is checked (and
    preprocessed) before any is run: a bad one raises `Lfm2VlError` naming its index.
    """
    engine = BatchEngine(model, processor, max_rows=max_rows)
    ids = []
    for index, request in enumerate(requests):
        if "prompt" not in request:
            raise Lfm2VlError(f"request {index} has no 'prompt'")
        options = {**defaults, **{k: v for k, v in request.items() if k != "prompt"}}
        images = options.pop("images", None)
        try:
            ids.append(engine.submit(request["prompt"], images, **options))
        except Lfm2VlError as error:
            raise Lfm2VlError(f"request {index}: {error}") from None
    texts: dict[int, list[str]] = {i: [] for i in ids}
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    last: dict[int, GenerationChunk] = {}
    while engine.busy:
        for request_id, chunk in engine.step():
            texts[request_id].append(chunk.text)
            if chunk.token is not None:
                tokens[request_id].append(chunk.token)
            last[request_id] = chunk
    return [
        GenerationResult("".join(texts[i]), tokens[i], last[i].finish_reason, last[i].stats)
        for i in ids
    ]


class BatchWorker:
    """An engine on a thread of its own: any thread submits a request and iterates over its
    chunks as they are decoded, alongside everyone else's. Leaving the loop early (closing the
    iterator) cancels the request and frees its row. `close()` stops the thread."""

    def __init__(self, model: Lfm2VlModel, processor: Processor, **engine_options: Any):
        self.engine = BatchEngine(model, processor, **engine_options)
        self._streams: dict[int, queue.SimpleQueue] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="mlx-lfm2vl-batch", daemon=True)
        self._thread.start()

    def submit(
        self, prompt: str | Sequence[dict[str, Any]], images: Any = None, **options: Any
    ) -> Iterator[GenerationChunk]:
        """Like `stream_generate`, decoded together with the other requests. Bad input raises
        `Lfm2VlError` here."""
        stream: queue.SimpleQueue = queue.SimpleQueue()
        # Under the lock the loop dispatches chunks with: the stream is registered before any
        # chunk of this request can be dispatched.
        with self._wake:
            if self._error is not None:
                raise Lfm2VlError(f"the batch worker stopped on an error: {self._error!r}")
            if self._closed:
                raise Lfm2VlError("this BatchWorker is closed")
            request_id = self.engine.submit(prompt, images, **options)
            self._streams[request_id] = stream
            self._wake.notify()
        return self._chunks(request_id, stream)

    def _chunks(self, request_id: int, stream: queue.SimpleQueue) -> Iterator[GenerationChunk]:
        finished = False
        try:
            while True:
                chunk = stream.get()
                if isinstance(chunk, BaseException):
                    raise chunk
                yield chunk
                if chunk.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.engine.cancel(request_id)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.engine.busy and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
            try:
                events = self.engine.step()
            except BaseException as error:  # a bug or out of memory: every waiter gets it
                with self._wake:
                    self._error = error
                    for stream in self._streams.values():
                        stream.put(error)
                    self._streams.clear()
                return
            with self._wake:
                for request_id, chunk in events:
                    stream = self._streams.get(request_id)
                    if stream is not None:
                        stream.put(chunk)
                    if chunk.finish_reason is not None:
                        self._streams.pop(request_id, None)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def __enter__(self) -> BatchWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    # `python -m mlx_lfm2vl.batch` is the batch command line. Run the package's copy of it (and
    # so of this engine), not this second `__main__` copy, so there is one set of classes.
    from mlx_lfm2vl.batch_cli import run

    run()
