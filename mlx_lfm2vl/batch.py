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

With a `PromptCache`, admission starts a row from the cache snapshot of the longest prompt prefix
seen before (a conversation resent in full with one more turn: its earlier turns and images) and
prefills only the rest, storing a snapshot of its own where the next turn will need it.

Each row samples with its own settings, logits processors and PRNG key, so a seeded request
gives the tokens it gives alone whatever its neighbours (up to float32 rounding of a matmul over
several rows: logits agree to ~1e-6).

`batch_generate` runs a list of requests to the end; `BatchEngine` is the step-by-step engine a
server drives; `BatchWorker` runs an engine on a thread of its own and streams each request's
chunks to whichever thread submitted it. The command line (`python -m mlx_lfm2vl.batch`) lives in
`batch_cli.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from .cache import BatchConvCache, BatchKVCache, ConvCache, KVCache, snapshot
from .errors import ContextLengthError, Lfm2VlError
from .generate import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_STEP,
    SAMPLING_OPTIONS,
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
    from .generate import Cache
    from .image_processor import ImageBatch
    from .models.lfm2_vl import Lfm2VlModel
    from .processor import ProcessedInputs, Processor

DEFAULT_MAX_ROWS = 16
_REQUEST_OPTIONS = (*SAMPLING_OPTIONS, "max_tokens", "seed", "stop", "logits_processors")


@dataclass
class _Row:
    """One request: its inputs, sampling and answer. `image_keys` identify its images for the
    prompt cache; `cache` and `reused` (prompt tokens, images) are the cached prefix it starts
    from; `features` are the image features of the images after that prefix."""

    id: int
    inputs: ProcessedInputs
    sample: TokenSampler
    answer: Answer
    image_keys: tuple[bytes, ...] = ()
    last_token: mx.array | None = None
    cancelled: bool = False
    cache: Cache | None = field(default=None, repr=False)
    reused: tuple[int, int] = (0, 0)
    features: mx.array | None = field(default=None, repr=False)


@dataclass
class _Prefix:
    ids: np.ndarray
    images: tuple[bytes, ...]
    cache: Cache = field(repr=False)
    nbytes: int


class PromptCache:
    """Cache snapshots of prompt prefixes, the least recently used dropped beyond `max_bytes`.

    A prefix is its token ids plus, since every image token has the same id, a hash of each of
    its images' preprocessed pixels and view shapes (`image_hashes`): the same picture sent again
    matches, the same picture at other image settings does not. Snapshots are compact copies
    (no spare KV capacity, no view into a larger buffer), so `nbytes` is what they hold.
    The engine stores and looks up from its own thread only.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._prefixes: OrderedDict[tuple[bytes, tuple[bytes, ...]], _Prefix] = OrderedDict()

    def __len__(self) -> int:
        return len(self._prefixes)

    @staticmethod
    def image_hashes(images: ImageBatch | None) -> tuple[bytes, ...]:
        """One digest per image of a processed request."""
        if images is None:
            return ()
        digests, view, row = [], 0, 0
        patches = images.patches_per_view
        for views in images.views_per_image:
            count = int(patches[view : view + views].sum())
            digest = hashlib.blake2b(images.spatial_shapes[view : view + views].tobytes())
            digest.update(np.ascontiguousarray(images.pixel_values[row : row + count]).data)
            digests.append(digest.digest())
            view, row = view + views, row + count
        return tuple(digests)

    def lookup(self, ids: np.ndarray, images: tuple[bytes, ...]) -> tuple[int, int, Cache] | None:
        """The longest cached prefix that is shorter than `ids` and starts them, with its images
        first in `images`: (its tokens, its images, a copy of its cache to extend), or None."""
        best = None
        for key, prefix in self._prefixes.items():
            n, k = len(prefix.ids), len(prefix.images)
            if (
                (best is None or n > len(self._prefixes[best].ids))
                and n < len(ids)
                and prefix.images == images[:k]
                and np.array_equal(prefix.ids, ids[:n])
            ):
                best = key
        if best is None:
            return None
        self._prefixes.move_to_end(best)
        prefix = self._prefixes[best]
        return len(prefix.ids), len(prefix.images), snapshot(prefix.cache)

    def store(self, ids: np.ndarray, images: tuple[bytes, ...], cache: Cache) -> None:
        """Keep a compact copy of `cache`, the state after `ids` (holding `images`)."""
        key = (ids.tobytes(), images)
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            return
        copy = snapshot(cache)
        for layer in copy:
            if isinstance(layer, KVCache) and layer.keys is not None:
                layer.keys, layer.values = mx.contiguous(layer.keys), mx.contiguous(layer.values)
            elif isinstance(layer, ConvCache) and layer.conv_state is not None:
                layer.conv_state = mx.contiguous(layer.conv_state)
        states = [array for layer in copy for array in layer.state]
        mx.eval(states)
        nbytes = sum(array.nbytes for array in states)
        if nbytes > self.max_bytes:
            return
        self._prefixes[key] = _Prefix(ids.copy(), images, copy, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, dropped = self._prefixes.popitem(last=False)
            self.nbytes -= dropped.nbytes


class BatchEngine:
    """Requests in, chunks out, one `step()` at a time (not thread-safe but for `submit` and
    `cancel`, which may be called from any thread while one thread drives `step()`)."""

    def __init__(
        self,
        model: Lfm2VlModel,
        processor: Processor,
        max_rows: int = DEFAULT_MAX_ROWS,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
        prompt_cache: PromptCache | None = None,
        context_length: int | None = None,
    ):
        """`prompt_cache`: reuse prompt prefixes across requests (see `PromptCache`).
        `context_length`: refuse prompts that leave no room for a token in that many positions
        (`ContextLengthError`), and end answers there (finish_reason "length")."""
        if max_rows < 1:
            raise Lfm2VlError(f"max_rows must be at least 1, got {max_rows}")
        self.model, self.processor = model, processor
        self.max_rows = max_rows
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = prompt_cache
        self.context_length = context_length
        # Where a prompt's reusable prefix ends: after its last special token, as in chat.py
        # (`<|im_start|>` before `assistant`: every image token is a special token, so every
        # image is before it, and the next turn's prompt has the same ids up to there).
        self._special_ids = np.array(
            sorted(
                i for i, t in processor.tokenizer.get_added_tokens_decoder().items() if t.special
            ),
            np.int32,
        )
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
            **{k: request.get(k) for k in SAMPLING_OPTIONS}
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
        if self.context_length is not None:
            room = self.context_length - len(inputs.input_ids)
            if room < 1:
                raise ContextLengthError(
                    f"The prompt has {len(inputs.input_ids)} tokens, more than fit the context "
                    f"of {self.context_length} with a token to answer. Shorten the conversation, "
                    "send fewer or smaller images, or lower max_image_tokens."
                )
            max_tokens = min(max_tokens, room)
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
            image_keys=(
                PromptCache.image_hashes(inputs.images) if self.prompt_cache is not None else ()
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
        if self.prompt_cache is not None:
            for row in rows:
                found = self.prompt_cache.lookup(row.inputs.input_ids, row.image_keys)
                if found is not None:
                    tokens, images, row.cache = found
                    row.reused = (tokens, images)
                    row.answer.cached_tokens = tokens
        self._encode_images(rows)
        events, joining = [], []
        for row in rows:
            row.answer.prefill_start = time.perf_counter()
            cache = row.cache or self.model.make_cache()
            logits = self._prefill(row, cache)
            row.features = row.cache = None
            token, logprobs = row.sample(logits)
            chunk = row.answer.add(token.item(), logprobs[0], cancelled=row.cancelled)
            events.append((row.id, chunk))
            if chunk.finish_reason is None:
                row.last_token = token
                joining.append((row, cache))
        if joining:
            self._join([row for row, _ in joining], [cache for _, cache in joining])
        return events

    def _prefill(self, row: _Row, cache: Cache) -> mx.array:
        """Run the prompt after the reused prefix into `cache`; the logits of its last token.
        With a prompt cache, the prefill stops once after the last special token to store a
        snapshot there (as `Chat` does)."""
        ids, start = row.inputs.input_ids, row.reused[0]
        cut = len(ids)
        if self.prompt_cache is not None:
            special = np.flatnonzero(np.isin(ids, self._special_ids))
            cut = int(special[-1]) + 1 if len(special) else 0
        pieces = [(start, cut), (cut, len(ids))] if start < cut < len(ids) else [(start, len(ids))]
        features = row.features
        for a, b in pieces:
            logits = prefill(
                self.model,
                mx.array(ids[a:b], mx.int32)[None],
                cache=cache,
                step_size=self.prefill_step_size,
                image_features=features,
            )
            features = None  # every image is before the cut
            if self.prompt_cache is not None and b == cut > start:
                self.prompt_cache.store(ids[:cut], row.image_keys, cache)
        return logits

    def _encode_images(self, rows: list[_Row]) -> None:
        """Image features of every new request, in one vision call: views of equal shape from
        all of them run as one batch (`Lfm2VlModel.get_image_features`). The images of a
        reused prefix are skipped."""
        pixels, shapes, counts = [], [], []
        for row in rows:
            images = row.inputs.images
            if images is None or row.reused[1] == len(images.views_per_image):
                continue
            view = sum(images.views_per_image[: row.reused[1]])
            patch = int(images.patches_per_view[:view].sum())
            pixels.append(images.pixel_values[patch:])
            shapes.append(images.spatial_shapes[view:])
            counts.append((row, sum(images.tokens_per_view[view:])))
        if not counts:
            return
        features = self.model.get_image_features(
            mx.array(np.concatenate(pixels)), mx.array(np.concatenate(shapes))
        )
        start = 0
        for row, count in counts:
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


class _Mailbox:
    """Chunks handed from the worker thread to one consumer; `wake`, when set, is called after
    each (to resume a consumer awaiting them on an event loop)."""

    def __init__(self, logprobs: bool):
        self.logprobs = logprobs
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.wake: Callable[[], None] | None = None

    def put(self, item: GenerationChunk | BaseException) -> None:
        self.queue.put(item)
        if self.wake is not None:
            try:
                self.wake()
            except RuntimeError:  # the consumer's event loop is closed: nobody is waiting
                self.wake = None


class ChunkStream:
    """One request's chunks as the worker decodes them: `for chunk in stream` blocks for each,
    `async for chunk in stream` awaits each on an asyncio loop. `close()` (or leaving a `with`
    block, or dropping the stream), from any thread and at any time, cancels the request and
    frees its row at the next step."""

    def __init__(self, engine: BatchEngine, request_id: int, mailbox: _Mailbox):
        self.request_id = request_id
        self._engine, self._mailbox = engine, mailbox
        self._done = False
        self._ready: asyncio.Event | None = None

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> GenerationChunk:
        if self._done:
            raise StopIteration
        return self._take(self._mailbox.queue.get())

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._done:
            raise StopAsyncIteration
        if self._ready is None:
            # The callback holds the event, not this stream: a dropped stream is still collected.
            ready = self._ready = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._mailbox.wake = lambda: loop.call_soon_threadsafe(ready.set)
        while True:
            try:
                return self._take(self._mailbox.queue.get_nowait())
            except queue.Empty:
                # A chunk put after the check sets the event from the loop, so after this clear.
                self._ready.clear()
                await self._ready.wait()

    def _take(self, item: GenerationChunk | BaseException) -> GenerationChunk:
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finish_reason is not None
        return item

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._engine.cancel(self.request_id)

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class BatchWorker:
    """An engine on a thread of its own: any thread submits a request and iterates over its
    chunks (a `ChunkStream`) as they are decoded, alongside everyone else's. Closing a stream
    cancels its request and frees its row. `close()` stops the thread.

    Every MLX array is evaluated on the worker's thread (MLX streams belong to the thread that
    made them): chunks carry log-probabilities already computed only for requests submitted
    with `logprobs=True`; read them with `np.asarray(chunk.logprobs)`."""

    def __init__(self, model: Lfm2VlModel, processor: Processor, **engine_options: Any):
        self.engine = BatchEngine(model, processor, **engine_options)
        self._streams: dict[int, _Mailbox] = {}
        # Chunks of requests decoded before `submit` registered their stream (it preprocesses
        # outside the lock, so that a large image does not hold up everyone's chunks).
        self._early: dict[int, list[GenerationChunk]] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="mlx-lfm2vl-batch", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt: str | Sequence[dict[str, Any]],
        images: Any = None,
        *,
        logprobs: bool = False,
        **options: Any,
    ) -> ChunkStream:
        """Like `stream_generate`, decoded together with the other requests; `options` are
        `BatchEngine.submit`'s. Bad input raises `Lfm2VlError` here."""
        self._check_running()
        request_id = self.engine.submit(prompt, images, **options)
        mailbox = _Mailbox(logprobs)
        with self._wake:
            if self._error is not None or self._closed:
                self.engine.cancel(request_id)
                self._check_running()
            early = self._early.pop(request_id, [])
            for chunk in early:
                mailbox.put(chunk)
            if not early or early[-1].finish_reason is None:
                self._streams[request_id] = mailbox
            self._wake.notify()
        return ChunkStream(self.engine, request_id, mailbox)

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the worker's thread (every request failed with it), or
        None while it runs."""
        return self._error

    def _check_running(self) -> None:
        if self._error is not None:
            raise Lfm2VlError(f"the batch worker stopped on an error: {self._error!r}")
        if self._closed:
            raise Lfm2VlError("this BatchWorker is closed")

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            # MLX (0.32) gives every thread streams of its own and tears down those of a thread
            # that ended without this call only at interpreter exit, where doing so aborts the
            # process now and then ("terminate called without an active exception").
            mx.clear_streams()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self.engine.busy and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                streams = dict(self._streams)
            try:
                events = self.engine.step()
                # Streams not registered yet may want them: computed too (rare, first chunks).
                mx.eval(
                    [
                        chunk.logprobs
                        for request_id, chunk in events
                        if chunk.logprobs is not None
                        and getattr(streams.get(request_id), "logprobs", True)
                    ]
                )
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
                    if stream is None:
                        self._early.setdefault(request_id, []).append(chunk)
                        continue
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
