"""Tokenizer, chat template and `<image>` expansion: prompt + images -> the model's inputs.

Identical to the reference `Lfm2VlProcessor` (`transformers`): the same rendered prompt, the same
token ids, with neither torch nor transformers imported. The steps for one request:

    messages (or a prompt string, made one user turn) --chat template--> text with one `<image>`
    marker per image --expansion--> each marker becomes
        <|image_start|> [<|img_row_r_col_c|> <image>*n per tile ... <|img_thumbnail|> <image>*m]
        <|image_end|>        (a single view: <|image_start|> <image>*m <|image_end|>)
    --tokenizers (add_special_tokens=False: the template writes the bos token)--> input_ids

The number of `<image>` tokens per view is taken from the views the image processor actually
produced, so it always equals the number of features the model computes. The reference instead
recomputes it from sizes, which disagrees in one corner: a too-large image whose best tile grid is
1x1 (possible with `min_tiles=1`) becomes one `tile_size` view, yet the reference writes tokens for
the `smart_resize` size, so its ids do not fit its own features.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import mlx.core as mx
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .errors import Lfm2VlError
from .image_processor import ImageBatch, ImageInput, ImageProcessor, ImageProcessorSettings
from .image_processor import _read_json as _read_json_object

Message = Mapping[str, Any]

# Options of one call that are not image-processor settings.
_PROCESSOR_OPTIONS = ("use_image_special_tokens",)
# Content types the LFM2-VL templates render; anything else would vanish silently from the prompt.
_CONTENT_TYPES = ("text", "image", "image_url")
# Names a message's reasoning is passed under; templates read the first (as transformers aliases).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_STANDARD_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


@dataclass(frozen=True)
class ProcessedInputs:
    """One request, processed.

    text: the prompt before `<image>` expansion (the rendered chat template).
    input_ids: int32 (L,), with every image expanded to its tokens.
    images: the preprocessed images (views, rows/cols, tokens per view), or None.
    image_token_counts: `<image>` tokens of each image (for statistics).
    in_spans: bool (L,), for `encode(..., spans=...)`: which tokens begin inside a span.
    """

    text: str
    input_ids: np.ndarray
    images: ImageBatch | None
    image_token_counts: list[int]
    in_spans: np.ndarray | None = None

    @property
    def model_inputs(self) -> dict[str, mx.array]:
        """The keyword arguments of the model: `model(**inputs.model_inputs)`."""
        inputs = {"input_ids": mx.array(self.input_ids[None], dtype=mx.int32)}
        if self.images is not None:
            inputs["pixel_values"] = mx.array(self.images.pixel_values, dtype=mx.float32)
            inputs["spatial_shapes"] = mx.array(self.images.spatial_shapes, dtype=mx.int32)
        return inputs


class Processor:
    """Turns a prompt or chat messages plus images into the model's inputs; decodes its output."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        chat_template: str,
        special_tokens: dict[str, str],
        *,
        image_token: str = "<image>",
        image_start_token: str = "<|image_start|>",
        image_end_token: str = "<|image_end|>",
        image_thumbnail_token: str = "<|img_thumbnail|>",
        use_image_special_tokens: bool = True,
        eos_token_ids: Sequence[int] = (),
        generation_config: dict[str, Any] | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        # Every special token by role name (bos_token, eos_token, image_token, ...): the template
        # sees them as variables, as the reference passes its tokenizer's special_tokens_map.
        self.special_tokens = dict(special_tokens)
        self.image_token = image_token
        self.image_start_token = image_start_token
        self.image_end_token = image_end_token
        self.image_thumbnail_token = image_thumbnail_token
        self.use_image_special_tokens = use_image_special_tokens
        self.image_token_id = _token_id(tokenizer, image_token)
        bos = special_tokens.get("bos_token")
        self.bos_token_id = tokenizer.token_to_id(bos) if bos else None
        eos = special_tokens.get("eos_token")
        ids = list(eos_token_ids) + ([_token_id(tokenizer, eos)] if eos else [])
        self.eos_token_ids: list[int] = list(dict.fromkeys(ids))  # ordered, no duplicates
        self._template = _compile_template(chat_template)
        # The checkpoint's generation_config.json: generation reads its sampling defaults here.
        self.generation_config: dict[str, Any] = dict(generation_config or {})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Processor:
        """Load from a checkpoint folder (published HF layout or a converted MLX folder).

        - tokenizer: `tokenizer.json` (the `tokenizers` library);
        - special tokens: `tokenizer_config.json`, else `special_tokens_map.json`;
        - chat template: `chat_template.jinja`, else `chat_template.json`, else the
          `chat_template` of `tokenizer_config.json`;
        - `use_image_special_tokens`: `processor_config.json`, at the top level or under its
          `"image_processor"` object (default true);
        - end-of-sequence ids: `generation_config.json`'s `eos_token_id` plus the eos token;
          the whole file is kept as `generation_config` (sampling defaults);
        - image settings: `ImageProcessor.from_pretrained` (see `resolve_settings`).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise Lfm2VlError(f"{folder} is not a folder. Pass a downloaded checkpoint folder.")
        tokenizer = _load_tokenizer(folder)
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        special_tokens = _special_tokens(tokenizer_config, special_map)

        def image_special(key: str, default: str) -> str:
            return special_tokens.get(key) or default

        processor_config = _read_json(folder / "processor_config.json")
        nested = processor_config.get("image_processor")
        nested = nested if isinstance(nested, dict) else {}
        use_special = processor_config.get(
            "use_image_special_tokens", nested.get("use_image_special_tokens")
        )
        generation_config = _read_json(folder / "generation_config.json")
        eos = generation_config.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])

        processor = cls(
            tokenizer,
            ImageProcessor.from_pretrained(folder),
            _load_chat_template(folder, tokenizer_config),
            special_tokens,
            image_token=image_special("image_token", "<image>"),
            image_start_token=image_special("image_start_token", "<|image_start|>"),
            image_end_token=image_special("image_end_token", "<|image_end|>"),
            # The reference looks for `image_thumbnail_token`, which the published files never
            # set (they say `image_thumbnail`), so it always uses the default.
            image_thumbnail_token=image_special("image_thumbnail_token", "<|img_thumbnail|>"),
            use_image_special_tokens=True if use_special is None else bool(use_special),
            eos_token_ids=eos_ids,
            generation_config=generation_config,
        )
        config = _read_json(folder / "config.json")
        model_image_id = config.get("image_token_id", config.get("image_token_index"))
        if model_image_id is not None and model_image_id != processor.image_token_id:
            raise Lfm2VlError(
                f"config.json says the image token id is {model_image_id}, but tokenizer.json "
                f"maps {processor.image_token!r} to {processor.image_token_id}: the tokenizer does "
                f"not belong to this model. Re-download the checkpoint's tokenizer files."
            )
        return processor

    # ----------------------------------------------------------------------------------------
    # Prompt text
    # ----------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """Render chat messages as the reference's `apply_chat_template(..., tokenize=False)`.

        `variables` are passed to the template (e.g. `tools=[...]`).
        """
        chat = _check_messages(messages)
        context = {"tools": None, "documents": None, **self.special_tokens, **variables}
        context = _plain(context)
        try:
            return self._template.render(
                messages=chat, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as e:
            raise Lfm2VlError(f"The chat template rejected the messages: {e}") from e

    def prompt_text(
        self, prompt: str | Sequence[Message], num_images: int, add_generation_prompt: bool = True
    ) -> str:
        """The rendered prompt of `prompt` (a string or messages), before image expansion.

        A string becomes one user turn. Its `<image>` markers, if it has any, place the images;
        without markers the images go before the text, as in the model card's examples.
        """
        if isinstance(prompt, str):
            content: list[dict[str, Any]] = []
            if self.image_token not in prompt:
                content = [{"type": "image"} for _ in range(num_images)]
            messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
        else:
            messages = prompt
        return self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    # ----------------------------------------------------------------------------------------
    # Model inputs
    # ----------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[Message],
        images: ImageInput | Sequence[ImageInput] | None = None,
        **options: Any,
    ) -> dict[str, mx.array]:
        """Model inputs for a prompt string or chat messages and their images.

        Returns `{"input_ids": (1, L) int32}`, plus `pixel_values` (total_patches, 768) float32
        and `spatial_shapes` (views, 2) int32 when there are images: `model(**inputs)`.
        `options` are image options for this call (`max_image_tokens`, `do_image_splitting`,
        `use_thumbnail`, ...) and `use_image_special_tokens`.
        """
        return self.process(prompt, images, **options).model_inputs

    def process(
        self,
        prompt: str | Sequence[Message],
        images: ImageInput | Sequence[ImageInput] | None = None,
        **options: Any,
    ) -> ProcessedInputs:
        """Like `__call__`, with the intermediate results (text, images, token counts)."""
        images = _image_list(images)
        return self.encode(self.prompt_text(prompt, len(images)), images, **options)

    def encode(
        self,
        text: str,
        images: ImageInput | Sequence[ImageInput] | None = None,
        spans: Sequence[tuple[int, int]] = (),
        **options: Any,
    ) -> ProcessedInputs:
        """Process an already rendered prompt: the reference's `processor(text=..., images=...)`.

        Each `<image>` marker in `text` stands for the next image and is expanded to its tokens.
        `spans`, character ranges [start, end) of `text` that hold no image marker (the
        assistant's text, for a training loss), give `in_spans`: the tokens that begin inside
        one.
        """
        images = _image_list(images)
        self._check_options(options)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            # Lone surrogates: how Python keeps bytes it could not decode (command lines, file
            # names); the tokenizer takes only text.
            raise Lfm2VlError(
                f"The prompt holds {text[e.start]!r} at character {e.start}, which is not text "
                "(an undecodable byte?). Decode the input as UTF-8 first."
            ) from None
        markers = text.count(self.image_token)
        if markers != len(images):
            raise Lfm2VlError(
                f"The prompt has {markers} {self.image_token} marker(s) but {len(images)} "
                f"image(s) were given. Pass exactly one image per {self.image_token} marker "
                f'(an {{"type": "image"}} content item in a message), in order.'
            )
        use_special = options.pop("use_image_special_tokens", self.use_image_special_tokens)
        for start, end in spans:
            if self.image_token in text[start:end]:
                raise Lfm2VlError(
                    f"a span of the text ({text[start:end][:40]!r}...) holds an image marker"
                )
        if not images:
            encoding = self.tokenizer.encode(text, add_special_tokens=False)
            ids = np.asarray(encoding.ids, np.int32)
            in_spans = _in_spans(encoding.offsets, spans) if spans else None
            return ProcessedInputs(text, ids, None, [], in_spans)

        batch = self.image_processor(images, **options)
        pieces = text.split(self.image_token)
        expanded = [pieces[0]]
        counts = []
        first_view = 0
        # Where each marker sits in `text`, and how much longer the text is after it: the spans
        # move by the expansion of the markers before them.
        marker_ends, growth = [], [0]
        for i, views in enumerate(batch.views_per_image):
            tokens = batch.tokens_per_view[first_view : first_view + views]
            first_view += views
            counts.append(sum(tokens))
            placeholder = self._image_placeholder(
                batch.image_rows[i], batch.image_cols[i], tokens, use_special
            )
            expanded += [placeholder, pieces[i + 1]]
            marker_ends.append(sum(map(len, pieces[: i + 1])) + (i + 1) * len(self.image_token))
            growth.append(growth[-1] + len(placeholder) - len(self.image_token))
        encoding = self.tokenizer.encode("".join(expanded), add_special_tokens=False)
        in_spans = None
        if spans:
            moved = [
                tuple(p + growth[int(np.searchsorted(marker_ends, p, side="right"))] for p in span)
                for span in spans
            ]
            in_spans = _in_spans(encoding.offsets, moved)
        ids = np.asarray(encoding.ids, np.int32)
        return ProcessedInputs(text, ids, batch, counts, in_spans)

    def _image_placeholder(
        self, rows: int, cols: int, tokens_per_view: list[int], use_special: bool
    ) -> str:
        """The reference's `_build_image_tokens`, with token counts of the actual views."""
        parts = [self.image_start_token] if use_special else []
        if rows > 1 or cols > 1:
            for view, tokens in enumerate(tokens_per_view[: rows * cols]):
                if use_special:
                    parts.append(f"<|img_row_{view // cols + 1}_col_{view % cols + 1}|>")
                parts.append(self.image_token * tokens)
            if len(tokens_per_view) > rows * cols:  # the thumbnail
                if use_special:
                    parts.append(self.image_thumbnail_token)
                parts.append(self.image_token * tokens_per_view[-1])
        else:
            parts.append(self.image_token * tokens_per_view[0])
        if use_special:
            parts.append(self.image_end_token)
        return "".join(parts)

    def _check_options(self, options: dict[str, Any]) -> None:
        valid = [f.name for f in fields(ImageProcessorSettings)] + list(_PROCESSOR_OPTIONS)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise Lfm2VlError(
                f"Unknown option(s) {', '.join(unknown)}. Valid options: {', '.join(valid)}."
            )
        image_options = {k: v for k, v in options.items() if k not in _PROCESSOR_OPTIONS}
        if image_options:  # invalid values fail now, even when there is no image
            self.image_processor.settings.replace(**image_options)

    # ----------------------------------------------------------------------------------------
    # Output
    # ----------------------------------------------------------------------------------------

    def decode(
        self, ids: Sequence[int] | np.ndarray | mx.array, skip_special_tokens: bool = False
    ) -> str:
        """Token ids -> text, as the reference tokenizer's `decode` (no space clean-up)."""
        ids = np.asarray(ids).reshape(-1).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _in_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Which tokens (character offsets [start, end)) begin inside one of `spans`."""
    starts = np.asarray([start for start, _ in offsets], dtype=np.int64)
    inside = np.zeros(len(starts), dtype=bool)
    for start, end in spans:
        inside |= (starts >= start) & (starts < end)
    return inside


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the file does not exist."""
    return _read_json_object(path) if path.is_file() else {}


def _load_tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise Lfm2VlError(
            f"{path} is missing. Download the checkpoint's tokenizer.json into {folder} "
            "(e.g. `hf download <repo> tokenizer.json --local-dir <folder>`)."
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad files
        raise Lfm2VlError(f"Cannot read {path}: {e}. Re-download tokenizer.json.") from e


def _special_tokens(
    tokenizer_config: dict[str, Any], special_map: dict[str, Any]
) -> dict[str, str]:
    """Special tokens by role, `tokenizer_config.json` first (as transformers reads them)."""

    def content(value: Any) -> str | None:
        # Either "<tok>" or an AddedToken dict {"content": "<tok>", ...}.
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    # special_tokens_map.json holds nothing but special tokens; tokenizer_config.json holds them
    # under the standard names and in `extra_special_tokens` (the image tokens).
    tokens: dict[str, str] = {}
    extra = tokenizer_config.get("extra_special_tokens")
    configured = {k: v for k, v in tokenizer_config.items() if k in _STANDARD_SPECIAL_TOKENS}
    for source in (special_map, configured, extra if isinstance(extra, dict) else {}):
        for key, value in source.items():
            if content(value) is not None:
                tokens[key] = content(value)
    return tokens


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise Lfm2VlError(
            f"The tokenizer has no {token!r} token: tokenizer.json does not belong to an LFM2-VL "
            "checkpoint. Re-download the checkpoint's tokenizer files."
        )
    return token_id


def _load_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise Lfm2VlError(
            f"No chat template in {folder}: expected chat_template.jinja, chat_template.json or "
            "a chat_template in tokenizer_config.json. Download the checkpoint's "
            "chat_template.jinja."
        )
    return template


# --------------------------------------------------------------------------------------------
# Messages and the template environment
# --------------------------------------------------------------------------------------------


def _image_list(images: ImageInput | Sequence[ImageInput] | None) -> list[ImageInput]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _check_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Validated plain copies of `messages`, normalized as the reference normalizes them."""
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence) or not messages:
        raise Lfm2VlError(
            'Messages must be a non-empty list of {"role": ..., "content": ...} dicts, or pass a '
            "prompt string."
        )
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise Lfm2VlError(
                f'Message {i} is not a {{"role": ..., "content": ...}} dict: {message!r}.'
            )
        # As the reference: keys set to None are dropped (content=None renders nothing, not
        # "None"), and OpenAI "image_url" items are images.
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            items = []
            for item in content:
                kind = item.get("type") if isinstance(item, Mapping) else None
                if kind not in _CONTENT_TYPES:
                    raise Lfm2VlError(
                        f"Message {i} has a content item of unknown type {kind!r} ({item!r}). "
                        'Use {"type": "text", "text": ...} or {"type": "image"}.'
                    )
                if kind == "text" and not isinstance(item.get("text"), str):
                    raise Lfm2VlError(
                        f'Message {i} has a text item without a "text" string: {item!r}.'
                    )
                items.append({"type": "image"} if kind == "image_url" else dict(item))
            message["content"] = items
        elif content is not None and not isinstance(content, str):
            raise Lfm2VlError(
                f"Message {i} content must be a string or a list of content items, got "
                f"{type(content).__name__}."
            )
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(_plain(message))
    return chat


def _plain(value: Any) -> Any:
    """Plain JSON-like data for the sandbox, as the reference: other objects (images, arrays in
    content items) become an inert "<TypeName>" string that templates never read."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (templates that mark assistant
    text for training masks use it; transformers accepts it, so must we)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    # A `dict` global without attribute access to the type (the reference's sandbox hardening).
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces that refuse underscore attributes, as the reference's, so no template can reach
    # Python internals through them.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes, got {name!r}."
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _compile_template(source: str) -> jinja2.Template:
    """The template in the environment transformers renders chat templates in: a sandbox (the
    templates come from the Hub), trim_blocks + lstrip_blocks, loop controls, and its globals."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise Lfm2VlError(
            f"The chat template does not parse ({e}). Re-download chat_template.jinja."
        ) from e


__all__ = ["ProcessedInputs", "Processor"]
