"""A multi-turn conversation that reuses its prefix instead of prefilling it again.

Each turn renders the whole history with the chat template, as a cold request would, and then
runs only the text that the cached prefix does not cover: earlier images are neither preprocessed
nor encoded again, and earlier turns are not prefilled again.

The short-conv layers keep a running state that cannot be rolled back (unlike a KV cache), so
the reusable point must be captured while it is current: every turn's prefill stops once at the
end of the last special token of the prompt (`<|im_start|>` before `assistant`), snapshots the
whole cache there, then runs the rest. A special token there matters: the tokenizer splits text
at special tokens before anything else, so the ids of "cached text + new text" equal the ids of
the whole rendered conversation, which makes a continued conversation exactly a cold prefill of
its full history.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from .cache import snapshot
from .errors import Lfm2VlError
from .generate import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_STEP,
    SAMPLING_OPTIONS,
    GenerationChunk,
    GenerationResult,
    _check_seed,
    _Part,
    _run,
    _stop_list,
    checkpoint_sampling,
)

if TYPE_CHECKING:
    from .generate import Cache
    from .models.lfm2_vl import Lfm2VlModel
    from .processor import Processor

_TURN_OPTIONS = (
    *SAMPLING_OPTIONS,
    "max_tokens",
    "stop",
    "seed",
    "logits_processors",
    "should_stop",
    "prefill_step_size",
)


def _check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(_TURN_OPTIONS))
    if unknown:
        raise Lfm2VlError(
            f"unknown Chat option(s) {', '.join(unknown)}: valid ones are "
            f"{', '.join(_TURN_OPTIONS)}; image options go in image_options={{...}}"
        )


class Chat:
    """A conversation with one model: `send()` streams a reply, `ask()` returns it whole.

    `options` are defaults for every turn: sampling (`temperature`, `top_p`, `top_k`, `min_p`,
    `repetition_penalty`, `repetition_context_size`, `seed`), `max_tokens`, `stop`,
    `logits_processors`, `prefill_step_size`. `image_options` (`max_image_tokens`, ...) are
    fixed for the whole conversation, since earlier images keep the tokens they were given.

    Not thread-safe: one turn at a time. A turn cut short (generator closed, `should_stop`)
    keeps the partial reply in the history.
    """

    def __init__(
        self,
        model: Lfm2VlModel,
        processor: Processor,
        *,
        system: str | None = None,
        image_options: dict[str, Any] | None = None,
        **options: Any,
    ):
        self.model = model
        self.processor = processor
        _check_options(options)
        self.image_options = dict(image_options or {})
        self.options = options
        self.messages: list[dict[str, Any]] = []
        if system is not None:
            self.messages.append({"role": "system", "content": system})
        self.images: list[Any] = []
        # Text the prefix tokens are made of; split points are the ends of these strings.
        self._special_tokens = [
            token.content
            for token in processor.tokenizer.get_added_tokens_decoder().values()
            if token.special
        ]
        self._cached: Cache | None = None  # cache snapshot after `_cached_text`
        self._cached_text = ""
        self._cached_ids = np.zeros(0, np.int32)

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.images = []
        self._cached, self._cached_text = None, ""
        self._cached_ids = np.zeros(0, np.int32)

    def ask(self, text: str, images: Any | Sequence[Any] | None = None, **options: Any):
        """The whole reply to one user turn (`GenerationResult`)."""
        texts, tokens, chunk = [], [], None
        for chunk in self.send(text, images, **options):
            texts.append(chunk.text)
            if chunk.token is not None:
                tokens.append(chunk.token)
        assert chunk is not None and chunk.finish_reason is not None
        return GenerationResult("".join(texts), tokens, chunk.finish_reason, chunk.stats)

    def send(
        self, text: str, images: Any | Sequence[Any] | None = None, **options: Any
    ) -> Iterator[GenerationChunk]:
        """Stream the reply to one user turn with `images` (placed before the text).

        `options` override the conversation's defaults for this turn (see the class).
        """
        start_time = time.perf_counter()
        if images is None:
            images = []
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        _check_options(options)
        options = {**self.options, **options}
        settings = checkpoint_sampling(self.processor).override(
            **{k: options.pop(k) for k in SAMPLING_OPTIONS if k in options}
        )
        settings.sampler()  # invalid values fail before any work
        settings.logits_processors()
        _check_seed(options.get("seed"))

        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        messages = [*self.messages, {"role": "user", "content": content}]
        all_images = self.images + images
        full_text = self.processor.apply_chat_template(messages, add_generation_prompt=True)

        if self._cached is not None and full_text.startswith(self._cached_text):
            base_text, base_ids, cache = self._cached_text, self._cached_ids, snapshot(self._cached)
        else:  # first turn, or a template that re-renders earlier turns differently
            base_text, base_ids, cache = "", np.zeros(0, np.int32), self.model.make_cache()
        new_text = full_text[len(base_text) :]
        marker = self.processor.image_token
        n_new = new_text.count(marker)
        new_images = all_images[len(all_images) - n_new :] if n_new else []

        split = self._split_point(new_text)
        head, tail = new_text[:split], new_text[split:]
        parts, head_ids = [], np.zeros(0, np.int32)
        if head:
            processed = self.processor.encode(head, new_images, **self.image_options)
            head_ids = processed.input_ids
            part = _Part(head_ids)
            if processed.images is not None:
                part.pixel_values = mx.array(processed.images.pixel_values)
                part.spatial_shapes = mx.array(processed.images.spatial_shapes)
            parts.append(part)
        if tail or not parts:
            parts.append(_Part(self.processor.encode(tail).input_ids))
        history = np.concatenate([base_ids, *(p.input_ids for p in parts)])

        def remember_prefix(cache: Cache) -> None:
            self._cached = snapshot(cache)
            self._cached_text = base_text + head
            self._cached_ids = np.concatenate([base_ids, head_ids])

        reply: list[str] = []
        started = False
        try:
            for chunk in _run(
                self.model,
                self.processor.tokenizer,
                self.processor.eos_token_ids,
                parts,
                cache,
                history,
                settings,
                start_time=start_time,
                max_tokens=options.get("max_tokens", DEFAULT_MAX_TOKENS),
                stop=_stop_list(options.get("stop")),
                seed=options.get("seed"),
                logits_processors=options.get("logits_processors", ()),
                should_stop=options.get("should_stop"),
                prefill_step_size=options.get("prefill_step_size", DEFAULT_PREFILL_STEP),
                image_token_id=self.processor.image_token_id,
                after_prefix=remember_prefix if head else None,
            ):
                started = started or chunk.token is not None
                reply.append(chunk.text)
                yield chunk
        finally:
            if started:
                self.messages = [*messages, {"role": "assistant", "content": "".join(reply)}]
                self.images = all_images

    def _split_point(self, text: str) -> int:
        """End of the last special token in `text` (0 when it has none)."""
        return max((text.rfind(t) + len(t) for t in self._special_tokens if t in text), default=0)
