"""Streaming generation: prefill, one-token decode with the cache on the device, text out.

Layers, from the bottom:

- `prefill()` runs a prompt (image features merged) through the backbone into a cache and returns
  the logits of its last position only; the LM head never sees the other prompt rows.
- `generate_step()` samples from those logits, then decodes one token at a time. Step n+1 is
  queued with `mx.async_eval` before token n is handed to the caller, so the device works while
  Python detokenizes.
- `stream_generate()` / `generate()` add the processor, the streaming detokenizer, stop strings,
  cancellation and statistics. `Chat` (chat.py) drives the same loop with cache snapshots.
- `main()` is the command line (`python -m mlx_lfm2vl.generate --help`).

Nothing here keeps global state: the PRNG key, the cache and the stop bookkeeping belong to one
call, so two models (or two generations, one after the other) never see each other.
"""

from __future__ import annotations

import numbers
import random
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from .cache import ConvCache, KVCache
from .errors import Lfm2VlError
from .sampling import LogitsProcessor, Sampler, SamplingSettings

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from .constrained import JsonSchema
    from .models.lfm2_vl import Lfm2VlModel
    from .processor import Processor

Cache = list[KVCache | ConvCache]
StopCallback = Callable[[], bool] | threading.Event

DEFAULT_MODEL = "LiquidAI/LFM2-VL-450M"
DEFAULT_MAX_TOKENS = 256
# Prompt rows per prefill chunk: bounds the attention scores' memory on long image prompts.
DEFAULT_PREFILL_STEP = 2048


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationStats:
    """Counts and timings of one generation so far (times in seconds).

    time_to_first_token runs from the call (image preprocessing included) to the first sampled
    token; prompt_time covers the model's part of that (vision encoder + prefill).
    generation_tps counts the tokens after the first over the time since the first.
    peak_memory is MLX's peak allocation of the process in GB (`mx.get_peak_memory`; the
    library does not reset it, as that counter is shared by everything in the process).
    cached_tokens are the prompt tokens taken from a cached prefix instead of being prefilled
    (`batch.PromptCache`); they count in prompt_tokens too.
    """

    prompt_tokens: int
    image_tokens: int
    generation_tokens: int
    time_to_first_token: float
    prompt_time: float
    prompt_tps: float
    generation_tps: float
    peak_memory: float
    cached_tokens: int = 0


@dataclass(frozen=True)
class GenerationChunk:
    """One step of `stream_generate`.

    text: new text, possibly "" (held back while it may be an incomplete character or the start
        of a stop string); the texts of all chunks joined are the answer.
    token: the token sampled at this step (None only when cancelled before the first token).
    logprobs: (vocab,) log-probabilities of the model at this step, before any sampling rule.
    finish_reason: None while running, then "stop" (end-of-sequence token or stop string),
        "length" (max_tokens) or "cancelled" (`should_stop`); the last chunk has it set.
    """

    text: str
    token: int | None
    logprobs: mx.array | None
    finish_reason: str | None
    stats: GenerationStats


@dataclass(frozen=True)
class GenerationResult:
    """The whole answer of `generate`: text, sampled tokens (with the final end-of-sequence
    token, if any; its text is not in `text`), finish_reason and statistics."""

    text: str
    tokens: list[int]
    finish_reason: str
    stats: GenerationStats


# --------------------------------------------------------------------------------------------
# Text out: streaming detokenizer and stop strings
# --------------------------------------------------------------------------------------------


class StreamingDetokenizer:
    """Token ids in, text out as soon as it is final, never half a character.

    Byte-level BPE tokens can end inside a multi-byte UTF-8 character, which decodes to U+FFFD
    until the rest arrives; text is emitted only when the decoded tail does not end in one.
    Decoding restarts from the previous emission point (not from the last token), so tokenizers
    whose decoding depends on the left neighbour (leading-space rules) come out right too. The
    concatenation of all `add()` results and `flush()` is `tokenizer.decode(tokens)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.tokens: list[int] = []
        self._prefix = 0  # start of the window that is decoded again for context
        self._read = 0  # tokens up to here have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix : self._read])
        now = self._decode(self.tokens[self._prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return now[len(before) :]

    def flush(self) -> str:
        """The text not emitted yet, even an incomplete character (as a one-shot decode has it)."""
        before = self._decode(self.tokens[self._prefix : self._read])
        now = self._decode(self.tokens[self._prefix :])
        self._prefix = self._read = len(self.tokens)
        return now[len(before) :]


class StopStrings:
    """Cuts the text at the first stop string, holding back any tail that may begin one.

    A stop string that will appear must start inside the held-back tail (the longest tail that
    is a prefix of a stop string), so nothing already emitted ever needs taking back. The check
    runs after every piece fed (a token): the first piece that completes a stop string ends the
    text, cut where the earliest stop string found so far begins. (A longer stop string that
    began earlier but would only complete later does not count: generation has stopped.)
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        if not self.stop:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


# --------------------------------------------------------------------------------------------
# The model loop
# --------------------------------------------------------------------------------------------


def _is_set(should_stop: StopCallback | None) -> bool:
    if should_stop is None:
        return False
    return should_stop.is_set() if isinstance(should_stop, threading.Event) else should_stop()


def prefill(
    model: Lfm2VlModel,
    input_ids: mx.array,
    pixel_values: mx.array | None = None,
    spatial_shapes: mx.array | None = None,
    cache: Cache | None = None,
    step_size: int = DEFAULT_PREFILL_STEP,
    should_stop: StopCallback | None = None,
    image_features: mx.array | None = None,
) -> mx.array | None:
    """Run a prompt into `cache` (extending what it holds); logits (1, vocab) of its last token.

    The prompt goes through the backbone in chunks of `step_size` rows; a chunk appended to a
    cache attends to everything before it (MLX's "causal" mask aligns the chunk's last query
    with the last key). Returns None when `should_stop` fires between chunks. Images come as
    pixels, or as features already encoded (`Lfm2VlModel.get_image_features`).
    """
    if cache is None:
        cache = model.make_cache()
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    embeddings = model.get_input_embeddings(
        input_ids, pixel_values, spatial_shapes, image_features=image_features
    )
    L = embeddings.shape[1]
    start = 0
    while L - start > step_size:
        model.language_model(embeddings[:, start : start + step_size], cache)
        mx.eval([c.state for c in cache])
        start += step_size
        if _is_set(should_stop):
            return None
    hidden = model.language_model(embeddings[:, start:], cache)
    logits = model.lm_head_logits(hidden[:, -1:, :])[:, 0, :]
    mx.eval(logits, [c.state for c in cache])
    return logits


class TokenSampler:
    """One request's sampling: its sampler, its logits processors with the token context they
    see (`history`: the prompt ids, then every sampled token), and a PRNG key of its own."""

    def __init__(
        self,
        sampler: Sampler,
        logits_processors: Sequence[LogitsProcessor] = (),
        history: mx.array | None = None,
        key: mx.array | None = None,
    ):
        self.sampler = sampler
        self.logits_processors = list(logits_processors)
        self.history = history if history is not None else mx.zeros((0,), mx.int32)
        self.key = key if key is not None else _key(None)

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """Logits (1, vocab) -> the token (1,) int32 and the log-probabilities (1, vocab), lazy:
        a caller who never reads the log-probabilities never computes them (a log-softmax over
        the vocabulary, ~1-2 ms of a ~55 ms float32 CPU step at the 450M shapes)."""
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for processor in self.logits_processors:
            logits = processor(self.history, logits)
        self.key, subkey = mx.random.split(self.key)
        return self.sampler(logits, subkey).astype(mx.int32), logprobs

    def append(self, token: mx.array) -> None:
        """Add a sampled token (1,) to the context the logits processors see."""
        if self.logits_processors:
            self.history = mx.concatenate([self.history, token])


def generate_step(
    model: Lfm2VlModel,
    logits: mx.array,
    cache: Cache,
    *,
    sampler: Sampler,
    logits_processors: Sequence[LogitsProcessor] = (),
    history: mx.array | None = None,
    key: mx.array | None = None,
    max_tokens: int | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Sample from the prefill `logits`, then decode: yields (token, logprobs) until closed.

    `history` is the token context the logits processors see (the prompt ids, for the
    repetition penalty); sampled tokens are appended to it. `key` seeds the sampler. The
    logprobs are left lazy (see `TokenSampler`).
    """
    sample = TokenSampler(sampler, logits_processors, history, key)
    y, logprobs = sample(logits)
    mx.async_eval(y)
    n = 0
    while True:
        n += 1
        if max_tokens is not None and n >= max_tokens:
            yield y.item(), logprobs[0]
            return
        sample.append(y)
        next_y, next_logprobs = sample(model(y[None], cache=cache)[:, -1, :])
        # Queue step n+1 before handing out token n: the device runs while the caller works.
        mx.async_eval(next_y)
        yield y.item(), logprobs[0]
        y, logprobs = next_y, next_logprobs


@dataclass
class _Part:
    """A piece of prompt to prefill: ids (L,) and the pixel views of the images in it."""

    input_ids: np.ndarray
    pixel_values: mx.array | None = None
    spatial_shapes: mx.array | None = None


def _check_seed(seed: int | None) -> None:
    # mx.random.key takes an unsigned 64-bit seed; anything else is a bare TypeError there.
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise Lfm2VlError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")


def _key(seed: int | None) -> mx.array:
    # A key of our own, never MLX's global PRNG: two generations cannot disturb each other.
    _check_seed(seed)
    return mx.random.key(int(seed) if seed is not None else random.SystemRandom().getrandbits(63))


def _run(
    model: Lfm2VlModel,
    tokenizer: Tokenizer,
    eos_token_ids: Sequence[int],
    parts: Sequence[_Part],
    cache: Cache,
    history: np.ndarray,
    settings: SamplingSettings,
    *,
    start_time: float,
    max_tokens: int,
    stop: Sequence[str],
    seed: int | None,
    logits_processors: Sequence[LogitsProcessor],
    should_stop: StopCallback | None,
    prefill_step_size: int,
    image_token_id: int,
    after_prefix: Callable[[Cache], None] | None = None,
) -> Iterator[GenerationChunk]:
    """Prefill `parts` in order into `cache`, then stream the answer.

    `after_prefix(cache)` is called once the first part is in the cache (the chat helper
    snapshots there). `history` is the whole context for the repetition penalty.
    """
    if max_tokens < 1:
        raise Lfm2VlError(f"max_tokens must be at least 1, got {max_tokens}")
    sampler = settings.sampler()
    processors = settings.logits_processors() + list(logits_processors)
    answer = Answer(
        tokenizer,
        eos_token_ids,
        stop,
        max_tokens,
        prompt_tokens=sum(len(p.input_ids) for p in parts),
        image_tokens=sum(int((p.input_ids == image_token_id).sum()) for p in parts),
        start_time=start_time,
    )
    logits = None
    for i, part in enumerate(parts):
        logits = prefill(
            model,
            mx.array(part.input_ids, mx.int32)[None],
            part.pixel_values,
            part.spatial_shapes,
            cache,
            prefill_step_size,
            should_stop,
        )
        if logits is None:
            yield answer.cancelled()
            return
        if i == 0 and after_prefix is not None:
            after_prefix(cache)

    steps = generate_step(
        model,
        logits,
        cache,
        sampler=sampler,
        logits_processors=processors,
        history=mx.array(history, mx.int32) if processors else None,
        key=_key(seed),
        max_tokens=max_tokens,
    )
    for token, logprobs in steps:
        chunk = answer.add(token, logprobs, cancelled=_is_set(should_stop))
        yield chunk
        if chunk.finish_reason is not None:
            steps.close()
            return


class Answer:
    """One request's answer as its tokens arrive: text (streaming detokenizer, stop strings),
    the finish reason and the statistics. `add()` turns each sampled token into a chunk."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        eos_token_ids: Sequence[int],
        stop: Sequence[str],
        max_tokens: int,
        *,
        prompt_tokens: int,
        image_tokens: int,
        start_time: float,
    ):
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.stopper = StopStrings(stop)
        self.eos = set(eos_token_ids)
        self.max_tokens = max_tokens
        self.prompt_tokens, self.image_tokens = prompt_tokens, image_tokens
        self.start_time = start_time
        self.prefill_start = time.perf_counter()
        self.first_time = self.prompt_time = 0.0
        self.tokens: list[int] = []
        self.cached_tokens = 0

    def stats(self) -> GenerationStats:
        n = len(self.tokens)
        now = time.perf_counter()
        return GenerationStats(
            prompt_tokens=self.prompt_tokens,
            image_tokens=self.image_tokens,
            generation_tokens=n,
            time_to_first_token=self.first_time - self.start_time if n else 0.0,
            prompt_time=self.prompt_time,
            prompt_tps=self.prompt_tokens / self.prompt_time if self.prompt_time > 0 else 0.0,
            generation_tps=(n - 1) / (now - self.first_time) if n > 1 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            cached_tokens=self.cached_tokens,
        )

    def add(self, token: int, logprobs: mx.array | None, cancelled: bool) -> GenerationChunk:
        """The chunk for the next sampled token; its finish_reason is set when the answer ends
        with it (end of sequence, a stop string, max_tokens, or `cancelled`)."""
        self.tokens.append(token)
        if len(self.tokens) == 1:
            self.first_time = time.perf_counter()
            self.prompt_time = self.first_time - self.prefill_start
        finish = None
        if token in self.eos:
            text, finish = self._flush(), "stop"
        else:
            text, hit = self.stopper.feed(self.detokenizer.add(token))
            if hit:
                finish = "stop"
            elif len(self.tokens) >= self.max_tokens or cancelled:
                text += self._flush()
                finish = "length" if len(self.tokens) >= self.max_tokens else "cancelled"
        return GenerationChunk(text, token, logprobs, finish, self.stats())

    def cancelled(self) -> GenerationChunk:
        """The last chunk of an answer cancelled before its first token, or between tokens."""
        return GenerationChunk(self._flush(), None, None, "cancelled", self.stats())

    def _flush(self) -> str:
        return self.stopper.feed(self.detokenizer.flush())[0] + self.stopper.flush()


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


# The sampling keywords of `generate` (and of `Chat`'s turns and `BatchEngine.submit`), which
# `SamplingSettings` fills in from the checkpoint's defaults.
SAMPLING_OPTIONS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "repetition_context_size",
)


def checkpoint_sampling(processor: Processor) -> SamplingSettings:
    """The sampling defaults of the checkpoint a processor was loaded from.

    The model card's values, overridden by what its generation_config.json sets (when the
    processor carries it as `generation_config`).
    """
    config = getattr(processor, "generation_config", None)
    if isinstance(config, dict):
        return SamplingSettings.from_generation_config(config)
    return SamplingSettings()


def stream_generate(
    model: Lfm2VlModel,
    processor: Processor,
    prompt: str | Sequence[dict[str, Any]],
    images: Any | Sequence[Any] | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    json_schema: JsonSchema | None = None,
    should_stop: StopCallback | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    **image_options: Any,
) -> Iterator[GenerationChunk]:
    """Generate an answer to `prompt` (a string, or chat messages) about `images`, streamed.

    Yields one `GenerationChunk` per sampled token; the last one has `finish_reason` set.
    Sampling options left as None take the checkpoint's defaults (`checkpoint_sampling`).
    `temperature=0` is greedy decoding as the reference's `do_sample=False`: the most likely
    token, with a repetition penalty only if `repetition_penalty` is passed or the checkpoint's
    generation_config.json sets one (the model cards' 1.05 goes with sampling). `stop` strings
    end the answer and are not part of it. `image_options` go to the processor
    (`min_image_tokens`, `max_image_tokens`, `do_image_splitting`, ...; what they do, and why a
    lower `max_image_tokens` can give more tokens, is in `ImageProcessorSettings`). Cancel by
    leaving the loop (closing the generator) or with `should_stop`, a callable or
    `threading.Event` checked after every token and between prefill chunks. Raises
    `Lfm2VlError` for user errors (bad image, bad option, ...).

    `json_schema` constrains the answer to JSON that fits it: a JSON schema (a dict), or
    `"object"` for any JSON object (`constrained.py` says how; a schema that cannot be compiled
    raises `Lfm2VlError`). The answer ends with the end of the JSON (finish_reason "stop"),
    unless `max_tokens` comes first: then it is cut, unfinished JSON, with finish_reason
    "length" (a `stop` string may cut it too). The constraint applies after `logits_processors`.
    """
    start_time = time.perf_counter()
    settings = checkpoint_sampling(processor).override(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
    )
    settings.sampler()  # invalid values fail before any work
    settings.logits_processors()
    _check_seed(seed)
    if json_schema is not None:
        from .constrained import json_constraint  # imports llguidance only when used

        constraint = json_constraint(processor.tokenizer, processor.eos_token_ids, json_schema)
        logits_processors = [*logits_processors, constraint]
    processed = processor.process(prompt, images, **image_options)
    part = _Part(processed.input_ids)
    if processed.images is not None:
        part.pixel_values = mx.array(processed.images.pixel_values)
        part.spatial_shapes = mx.array(processed.images.spatial_shapes)
    yield from _run(
        model,
        processor.tokenizer,
        processor.eos_token_ids,
        [part],
        model.make_cache(),
        processed.input_ids,
        settings,
        start_time=start_time,
        max_tokens=max_tokens,
        stop=_stop_list(stop),
        seed=seed,
        logits_processors=logits_processors,
        should_stop=should_stop,
        prefill_step_size=prefill_step_size,
        image_token_id=processor.image_token_id,
    )


def generate(
    model: Lfm2VlModel,
    processor: Processor,
    prompt: str | Sequence[dict[str, Any]],
    images: Any | Sequence[Any] | None = None,
    **kwargs: Any,
) -> GenerationResult:
    """The whole answer at once; takes the arguments of `stream_generate`."""
    texts, tokens = [], []
    chunk = None
    for chunk in stream_generate(model, processor, prompt, images, **kwargs):
        texts.append(chunk.text)
        if chunk.token is not None:
            tokens.append(chunk.token)
    assert chunk is not None and chunk.finish_reason is not None
    return GenerationResult("".join(texts), tokens, chunk.finish_reason, chunk.stats)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _format_stats(stats: GenerationStats, finish_reason: str | None) -> list[str]:
    return [
        f"prompt: {stats.prompt_tokens} tokens ({stats.image_tokens} image), "
        f"{stats.prompt_tps:.1f} tokens/s; time to first token {stats.time_to_first_token:.3f} s",
        f"generation: {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tokens/s "
        f"(finish: {finish_reason})",
        f"peak memory: {stats.peak_memory:.3f} GB",
    ]


def _cli():
    # click is imported here so `import mlx_lfm2vl` does not pay for it.
    import click

    from .cli_options import (
        command,
        image_options,
        image_settings,
        max_tokens_option,
        model_option,
        sampling_options,
        seed_option,
    )

    @command()
    @model_option(DEFAULT_MODEL)
    @click.option(
        "--image",
        "images",
        multiple=True,
        metavar="PATH_OR_URL",
        help="Image file or http(s) URL; repeat for several images (they go before the prompt, "
        "or at its <image> markers).",
    )
    @click.option(
        "--prompt",
        required=True,
        help="The question or instruction. Each <image> in it marks where the next --image goes "
        "(then one marker per --image); without markers the images go before it.",
    )
    @click.option("--system", default=None, help="Optional system message.")
    @max_tokens_option(DEFAULT_MAX_TOKENS, "Most tokens to generate.")
    @sampling_options()
    @image_options()
    @seed_option("Seed for reproducible sampling (0 to 2**64 - 1).")
    @click.option(
        "--adapter-path",
        default=None,
        help="Folder of fine-tuned adapters to apply (python -m mlx_lfm2vl.lora --adapter-path).",
    )
    @click.option("--verbose", is_flag=True, help="Print model, dtype, device and speed to stderr.")
    def cli(
        model: str,
        images: tuple[str, ...],
        prompt: str,
        system: str | None,
        max_tokens: int,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        min_p: float | None,
        repetition_penalty: float | None,
        min_image_tokens: int | None,
        max_image_tokens: int | None,
        no_image_splitting: bool,
        seed: int | None,
        adapter_path: str | None,
        verbose: bool,
    ) -> None:
        """Answer a prompt about images with an LFM2-VL model; the text streams to stdout.

        \b
        Example:
          python -m mlx_lfm2vl.generate --image cat.jpg --prompt "Describe this image."
        """
        from pathlib import Path

        from . import load
        from .config import ModelConfig
        from .loading import resolve_model_path

        # Fail on a missing image, or text the shell passed in another encoding than UTF-8
        # (Python keeps its bytes as lone surrogates), before the (slow) model load.
        for image in images:
            if image.startswith(("http://", "https://")):
                continue
            if Path(image).is_dir():
                raise Lfm2VlError(f"image {image!r} is a folder: pass an image file or a URL")
            if not Path(image).is_file():
                raise Lfm2VlError(f"image {image!r} not found: pass an existing file or a URL")
        for flag, text in (("--prompt", prompt), ("--system", system or "")):
            bad = next((i for i, c in enumerate(text) if "\udc80" <= c <= "\udcff"), None)
            if bad is not None:
                raise Lfm2VlError(
                    f"{flag} is not UTF-8 text (byte 0x{ord(text[bad]) - 0xDC00:02x} at "
                    f"character {bad}): pass it in UTF-8 (a UTF-8 terminal, script or file)"
                )
        folder = resolve_model_path(model)
        mx.reset_peak_memory()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            loaded_model, processor = load(folder, adapter_path=adapter_path)
        for warning in caught:  # one line each, not Python's two-line format with source
            click.echo(f"warning: {warning.message}", err=True)
        settings = SamplingSettings.from_folder(folder)

        # `<image>` markers typed in the prompt place the images; without any, they go first.
        content = [] if processor.image_token in prompt else [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        image_options = image_settings(min_image_tokens, max_image_tokens, no_image_splitting)

        chunks = stream_generate(
            loaded_model,
            processor,
            messages,
            list(images),
            max_tokens=max_tokens,
            temperature=settings.temperature if temperature is None else temperature,
            top_p=settings.top_p if top_p is None else top_p,
            top_k=settings.top_k if top_k is None else top_k,
            min_p=settings.min_p if min_p is None else min_p,
            repetition_penalty=(
                settings.repetition_penalty if repetition_penalty is None else repetition_penalty
            ),
            seed=seed,
            **image_options,
        )
        chunk = None
        for chunk in chunks:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if verbose and chunk is not None:
            dtype = str(loaded_model.language_model.embedding_norm.weight.dtype).split(".")[-1]
            device = mx.default_device().type.name
            # Float32 compute may keep the stored bf16 matmul weights (cpu.kept_bf16_weights).
            table = loaded_model.language_model.embed_tokens.weight.dtype
            kept = table == mx.bfloat16 and dtype == "float32"
            weights = ", LM weights bf16 as stored" if kept else ""
            lines = [f"model: {folder} (compute dtype {dtype}{weights}, device {device})"]
            if device == "cpu":
                from .cpu.blas import blas_in_use

                lines.append(f"BLAS: {blas_in_use()}")
            quantization = ModelConfig.from_file(folder / "config.json").quantization
            if quantization:
                recipe = quantization.get("recipe")
                stored = f"{quantization['bits']}-bit {quantization.get('mode', 'affine')}"
                lines.append(f"weights: {stored}" + (f", recipe {recipe}" if recipe else ""))
            else:
                lines.append("weights: not quantized")
            lines += _format_stats(chunk.stats, chunk.finish_reason)
            click.echo("\n".join(lines), err=True)

    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (arguments from `sys.argv` when None); returns the exit code. User
    errors print one line on stderr."""
    from .cli_options import run_command

    return run_command(_cli(), argv, "python -m mlx_lfm2vl.generate", interrupted="aborted")


def run() -> None:
    """The program (`python -m mlx_lfm2vl.generate`, the `mlx-lfm2vl-generate` script): on
    Linux it first relaunches itself with a fast BLAS preloaded (`cpu.blas`); it replaces the
    process, so apps call `main()` instead."""
    from . import relaunch_with_fast_blas

    relaunch_with_fast_blas()
    sys.exit(main())


if __name__ == "__main__":
    # Run the package's copy of this module (already imported by `mlx_lfm2vl/__init__`), not
    # this second `__main__` copy, so there is one set of classes and functions.
    from mlx_lfm2vl.generate import run

    run()
