"""An OpenAI-compatible HTTP server: `python -m mlx_lfm2vl.server --model M`.

Endpoints: `GET /health`, `GET /v1/models` (and `/v1/models/{id}`), `POST /v1/chat/completions`
(one JSON answer, or server-sent events with `"stream": true`). Requests in flight are decoded
together by one `BatchWorker` (one model, continuous batching); a client that goes away cancels
its request, whose row is freed at the next step. Chat clients resend the whole conversation
each turn: the engine's `PromptCache` finds the earlier turns (images included) and prefills
only the new one.

A request becomes `BatchEngine.submit(messages, images, **options)`:

- messages: OpenAI's (`system`/`developer`, `user`, `assistant`, `tool`; string content or parts
  `text` and `image_url`) in the processor's form, each image part a `{"type": "image"}`;
- images: `data:` URLs (base64), `http(s)` URLs, and, only under `--allow-local-files DIR`,
  paths or `file://` URLs inside DIR; decoded here, before the engine sees them;
- options: `max_completion_tokens`/`max_tokens`, `temperature`, `top_p`, `seed`, `stop`, and the
  extra body fields `top_k`, `min_p`, `repetition_penalty`, `min_image_tokens`,
  `max_image_tokens`, `do_image_splitting`; `response_format` (`json_object`, `json_schema`)
  becomes the engine's `json_schema` (constrained decoding: the answer always parses and fits).

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status
the OpenAI API gives. The web stack is Starlette on uvicorn (the `server` extra).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import math
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import numpy as np

from .batch import DEFAULT_MAX_ROWS, BatchWorker, ChunkStream, PromptCache
from .errors import ContextLengthError, Lfm2VlError
from .generate import GenerationChunk
from .image_processor import load_image

try:
    import anyio
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as error:  # the server's dependencies are an extra; create_app says so
    _missing_dependency: ImportError | None = error
else:
    _missing_dependency = None

if TYPE_CHECKING:
    from .models.lfm2_vl import Lfm2VlModel
    from .processor import Processor

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_IMAGES = 16
DEFAULT_MAX_BODY_MB = 64
DEFAULT_PROMPT_CACHE_MB = 512
# Local image files are read whole; the cap of the library's URL downloads.
_MAX_FILE_BYTES = 64 << 20
_MAX_TOP_LOGPROBS = 20
# OpenAI's roles, as the chat template names them ("developer" is OpenAI's newer "system").
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
_IMAGE_OPTIONS = {"min_image_tokens": int, "max_image_tokens": int, "do_image_splitting": bool}


@dataclass(frozen=True)
class ServerSettings:
    """What a server accepts. `allowed_folder` is resolved (no symlinks): local image files are
    read from inside it only; None reads none. `context_length` bounds prompt + answer."""

    model_id: str
    api_key: str | None = None
    allowed_folder: Path | None = None
    max_images: int = DEFAULT_MAX_IMAGES
    max_body_bytes: int = DEFAULT_MAX_BODY_MB << 20
    max_tokens: int = DEFAULT_MAX_TOKENS
    context_length: int | None = None


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.kind, "param": self.param}
        return {"error": {**error, "code": self.code}}

    def response(self) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ------------------------------------------------------------------------------------------
# The request: OpenAI's JSON -> the engine's arguments
# ------------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """A chat completion request, checked and translated."""

    messages: list[dict[str, Any]]
    images: list[tuple[str, str]]  # (param, url) of each image, in prompt order
    options: dict[str, Any]  # BatchEngine.submit's options
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


def _value(body: dict[str, Any], name: str, kind: type, low: float | None = None) -> Any:
    """body[name] if set (None when absent or null), checked to be of `kind` and >= low."""
    value = body.get(name)
    if value is None:
        return None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
    names = {bool: "true or false", int: "an integer", float: "a number"}
    if not ok:
        raise ApiError(400, f"'{name}' must be {names[kind]}, got {value!r}.", param=name)
    if low is not None and value < low:
        raise ApiError(400, f"'{name}' must be at least {low}, got {value!r}.", param=name)
    return value


def _messages(raw: Any) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """OpenAI messages -> the processor's messages and the image URLs, in order."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list of messages.", param="messages")
    messages, images = [], []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(
                400, f"{where} must be an object with 'role' and 'content'.", param=where
            )
        role = _ROLES.get(message.get("role"))
        if role is None:
            raise ApiError(
                400,
                f"{where} has role {message.get('role')!r}: use one of {', '.join(_ROLES)}.",
                param=f"{where}.role",
            )
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                here = f"{where}.content[{j}]"
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise ApiError(400, f"{here} has no image_url.url string.", param=here)
                    images.append((here, url))
                    parts.append({"type": "image"})
                else:
                    raise ApiError(
                        400,
                        f"{here} is not a text part with a 'text' string or an image_url part "
                        f"(got type {kind!r}); other content types are not supported.",
                        param=here,
                    )
            content = parts
        elif content is not None and not isinstance(content, str):
            raise ApiError(
                400, f"{where}.content must be a string or a list of parts.", param=where
            )
        messages.append({"role": role, "content": content})
    return messages, images


def _json_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema a `response_format` asks for (None for plain text)."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return schema
        raise ApiError(
            400,
            "response_format json_schema needs a 'json_schema' object with a 'schema' object.",
            param="response_format",
        )
    raise ApiError(
        400,
        '\'response_format\' must be {"type": "text"}, {"type": "json_object"} or '
        '{"type": "json_schema", "json_schema": {...}}.',
        param="response_format",
    )


def parse_chat_request(body: Any, settings: ServerSettings) -> ChatRequest:
    """Check a /v1/chat/completions body and translate it (`ApiError` for what is wrong)."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = body.get("model", settings.model_id)
    if model not in (settings.model_id, Path(settings.model_id).name):
        raise ApiError(
            404,
            f"The model {model!r} does not exist here: this server runs {settings.model_id!r} "
            "(GET /v1/models).",
            param="model",
            code="model_not_found",
        )
    messages, images = _messages(body.get("messages"))
    if len(images) > settings.max_images:
        raise ApiError(
            400,
            f"The request has {len(images)} images; this server takes at most "
            f"{settings.max_images} per request (--max-images). Send fewer images.",
            param="messages",
            code="too_many_images",
        )
    if _value(body, "n", int) not in (None, 1):
        raise ApiError(400, "Only n=1 is supported.", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if _value(body, name, float):
            raise ApiError(400, f"'{name}' is not supported: use 'repetition_penalty'.", param=name)
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported by this server.", param=name)

    options: dict[str, Any] = {}
    max_tokens = _value(body, "max_completion_tokens", int, 1)
    if max_tokens is None:
        max_tokens = _value(body, "max_tokens", int, 1)
    options["max_tokens"] = settings.max_tokens if max_tokens is None else max_tokens
    for name, kind, low in (
        ("temperature", float, 0),
        ("top_p", float, None),
        ("top_k", int, 0),
        ("min_p", float, 0),
        ("repetition_penalty", float, None),
        ("seed", int, 0),
    ):
        value = _value(body, name, kind, low)
        if value is not None:
            options[name] = value
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of strings.", param="stop")
        options["stop"] = stop
    for name, kind in _IMAGE_OPTIONS.items():
        value = _value(body, name, kind, 1 if kind is int else None)
        if value is not None:
            options[name] = value
    if body.get("response_format") is not None:
        schema = _json_schema(body["response_format"])
        if schema is not None:
            options["json_schema"] = schema  # constrained decoding (constrained.py)

    stream = bool(_value(body, "stream", bool))
    stream_options = body.get("stream_options")
    if stream_options is not None and (not stream or not isinstance(stream_options, dict)):
        raise ApiError(
            400, "'stream_options' is an object, allowed only with stream=true.", "stream_options"
        )
    logprobs = bool(_value(body, "logprobs", bool))
    top_logprobs = _value(body, "top_logprobs", int, 0)
    if top_logprobs is not None and (not logprobs or top_logprobs > _MAX_TOP_LOGPROBS):
        raise ApiError(
            400,
            f"'top_logprobs' must be 0 to {_MAX_TOP_LOGPROBS}, with logprobs=true.",
            param="top_logprobs",
        )
    return ChatRequest(
        messages,
        images,
        options,
        stream=stream,
        include_usage=bool((stream_options or {}).get("include_usage")),
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
    )


def read_image(param: str, url: str, settings: ServerSettings) -> np.ndarray:
    """Decode one image of a request (blocking: downloads and files). `ApiError` when it cannot
    be had: 400 for a bad data URL, an unreachable URL or an undecodable image; 403 for a file
    outside the allowed folder."""
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(
                400,
                f"{param}: a data URL must be base64, as data:image/png;base64,<data>.",
                param=param,
            )
        try:
            source: bytes | str = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(
                400, f"{param}: the data URL is not valid base64.", param=param
            ) from None
    elif url.startswith(("http://", "https://")):
        source = url
    else:
        source = str(_local_file(param, url, settings))
    try:
        return load_image(source)
    except Lfm2VlError as error:
        raise ApiError(400, f"{param}: {error}", param=param, code="invalid_image") from None


def _local_file(param: str, url: str, settings: ServerSettings) -> Path:
    """The real path of a local image the settings allow (symlinks resolved, inside the folder)."""
    folder = settings.allowed_folder
    if folder is None:
        raise ApiError(
            400,
            f"{param}: local image files are off. Send the image as a data: or http(s) URL, "
            "or start the server with --allow-local-files DIR.",
            param=param,
        )
    if url.startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(400, f"{param}: a file URL must be on this machine.", param=param)
        url = unquote(parsed.path)
    elif "://" in url:
        raise ApiError(
            400, f"{param}: use a data:, http(s):// or file:// URL, or a path.", param=param
        )
    # Resolved before any existence check, so that nothing outside the folder is probed.
    path = (folder / url).resolve()
    if not path.is_relative_to(folder):
        raise ApiError(
            403,
            f"{param}: the image is outside the folder this server may read.",
            param=param,
            kind="permission_error",
        )
    if not path.is_file():
        raise ApiError(400, f"{param}: no image file {url!r} in the allowed folder.", param=param)
    if path.stat().st_size > _MAX_FILE_BYTES:
        raise ApiError(400, f"{param}: the file is over {_MAX_FILE_BYTES >> 20} MB.", param=param)
    return path


# ------------------------------------------------------------------------------------------
# The answer: chunks -> OpenAI's JSON
# ------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): character -> the byte it stands for."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {
        **{chr(b): b for b in printable},
        **{chr(256 + n): b for n, b in enumerate(others)},
    }


class _Tokens:
    """Token strings and bytes for logprobs."""

    def __init__(self, processor: Processor):
        self.tokenizer = processor.tokenizer
        decoder = json.loads(self.tokenizer.to_str()).get("decoder") or {}
        self.byte_level = decoder.get("type") == "ByteLevel"
        self.eos = set(processor.eos_token_ids)

    @lru_cache(maxsize=65536)  # noqa: B019 (one instance per server, lives as long)
    def text_and_bytes(self, token: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.id_to_token(token) or ""
        table = _byte_decoder()
        if self.byte_level and all(c in table for c in piece):
            raw = bytes(table[c] for c in piece)
            return raw.decode("utf-8", errors="replace"), list(raw)
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        return text, list(text.encode("utf-8"))

    def entry(self, token: int, logprobs: np.ndarray, top: int) -> dict[str, Any]:
        def one(t: int) -> dict[str, Any]:
            text, raw = self.text_and_bytes(t)
            # JSON has no -inf; OpenAI writes -9999 for "never".
            return {"token": text, "logprob": max(float(logprobs[t]), -9999.0), "bytes": raw}

        best = np.argpartition(-logprobs, top - 1)[:top] if top else []
        best = sorted(best, key=lambda t: -logprobs[t])
        return {**one(token), "top_logprobs": [one(int(t)) for t in best]}


def _usage(chunk: GenerationChunk) -> dict[str, Any]:
    stats = chunk.stats
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generation_tokens,
        "total_tokens": stats.prompt_tokens + stats.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


class _EventStream:
    """A server-sent event response that cancels its request however it ends: finished, the
    client gone (uvicorn reports the disconnect and Starlette cancels the sending), or the server
    stopping."""

    def __init__(self, events: AsyncIterator[str], stream: ChunkStream):
        self.events, self.stream = events, stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        response = StreamingResponse(self.events, media_type="text/event-stream", headers=headers)
        try:
            await response(scope, receive, send)
        finally:
            self.stream.close()


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# ------------------------------------------------------------------------------------------
# The application
# ------------------------------------------------------------------------------------------


class _Api:
    """The endpoints; `worker` is set by the application's lifespan."""

    def __init__(self, processor: Processor, settings: ServerSettings):
        self.settings = settings
        self.worker: BatchWorker | None = None
        self.tokens = _Tokens(processor)
        self.created = int(time.time())

    # -------------------------------------------------------------- checks

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(
                401,
                "Missing API key: send it as 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect API key.", code="invalid_api_key")

    async def _body(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        too_large = ApiError(
            413,
            f"The request body is over {limit} bytes (--max-body-mb). Send smaller or fewer "
            "images, or pass them as URLs.",
            code="request_too_large",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            # Read to the end without keeping it, so that the client gets this answer rather
            # than a connection closed while it sends.
            async for _ in request.stream():
                pass
            raise too_large
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                async for _ in request.stream():
                    pass
                raise too_large
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(400, f"The request body is not valid JSON: {error}.") from None

    # -------------------------------------------------------------- endpoints

    async def health(self, request: Request) -> Response:
        worker = self.worker
        if worker is None or worker.error is not None:
            return JSONResponse({"status": "error"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.settings.model_id})

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.settings.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "mlx-lfm2vl",
        }

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request: Request) -> Response:
        self._authorize(request)
        name = request.path_params["name"]
        if name not in (self.settings.model_id, Path(self.settings.model_id).name):
            raise ApiError(404, f"The model {name!r} does not exist here.", code="model_not_found")
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        chat = parse_chat_request(await self._body(request), self.settings)
        images = [
            await anyio.to_thread.run_sync(read_image, param, url, self.settings)
            for param, url in chat.images
        ]
        submit = partial(
            self.worker.submit, chat.messages, images, logprobs=chat.logprobs, **chat.options
        )
        try:
            stream = await anyio.to_thread.run_sync(submit)
        except ContextLengthError as error:
            code = "context_length_exceeded"
            raise ApiError(400, str(error), param="messages", code=code) from None
        except Lfm2VlError as error:
            if self.worker.error is not None:  # not the request's fault: a 500
                raise
            raise ApiError(400, str(error)) from None
        reply = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "created": int(time.time()),
            "model": self.settings.model_id,
            "system_fingerprint": None,
        }
        if chat.stream:
            return _EventStream(self._events(chat, stream, reply), stream)
        try:
            chunks = await _until_disconnect(request, stream)
        finally:
            stream.close()
        if chunks is None:  # the client left: nobody to answer
            return Response(status_code=499)
        message = {"role": "assistant", "content": "".join(c.text for c in chunks)}
        choice = {"index": 0, "message": message, "logprobs": None}
        if chat.logprobs:
            choice["logprobs"] = {"content": self._logprobs(chunks, chat.top_logprobs)}
        choice["finish_reason"] = chunks[-1].finish_reason
        body = {**reply, "object": "chat.completion", "choices": [choice]}
        return JSONResponse({**body, "usage": _usage(chunks[-1])})

    def _logprobs(self, chunks: Sequence[GenerationChunk], top: int) -> list[dict[str, Any]]:
        return [
            self.tokens.entry(c.token, np.asarray(c.logprobs), top)
            for c in chunks
            if c.token is not None and c.token not in self.tokens.eos and c.logprobs is not None
        ]

    async def _events(
        self, chat: ChatRequest, stream: ChunkStream, reply: dict[str, Any]
    ) -> AsyncIterator[str]:
        def event(delta: dict[str, Any], finish: str | None = None, logprobs=None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            extra = {"usage": None} if chat.include_usage else {}
            return _sse({**reply, "object": "chat.completion.chunk", "choices": [choice], **extra})

        yield event({"role": "assistant", "content": ""})
        last = None
        try:
            async for chunk in stream:
                last = chunk
                if chunk.finish_reason == "cancelled":
                    return
                logprobs = None
                if chat.logprobs:
                    logprobs = {"content": self._logprobs([chunk], chat.top_logprobs)}
                if chunk.text or chunk.finish_reason or (logprobs and logprobs["content"]):
                    delta = {"content": chunk.text} if chunk.text else {}
                    yield event(delta, chunk.finish_reason, logprobs)
        except Exception as error:  # the worker failed: tell the client in the stream's shape
            logger.exception("generation failed")
            failure = ApiError(500, f"Generation failed: {error!r}", kind="server_error")
            yield _sse(failure.body())
            return
        if chat.include_usage and last is not None:
            usage = {**reply, "object": "chat.completion.chunk", "choices": []}
            yield _sse({**usage, "usage": _usage(last)})
        yield _sse("[DONE]")


async def _until_disconnect(request: Request, stream: ChunkStream) -> list[GenerationChunk] | None:
    """All the chunks of a request, or None when the client disconnects first."""
    chunks: list[GenerationChunk] = []
    finished = False
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        async for chunk in stream:
            chunks.append(chunk)
        finished = True
        group.cancel_scope.cancel()
    return chunks if finished else None


def create_app(
    model: Lfm2VlModel,
    processor: Processor,
    settings: ServerSettings,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    prompt_cache_mb: float = DEFAULT_PROMPT_CACHE_MB,
) -> Starlette:
    """The ASGI application. Its lifespan starts the `BatchWorker` (`app.state.worker`) and
    stops it; `prompt_cache_mb=0` turns prompt reuse off."""
    _require_web_stack()
    cache = PromptCache(int(prompt_cache_mb * (1 << 20))) if prompt_cache_mb > 0 else None
    context = settings.context_length or model.config.text.max_position_embeddings
    api = _Api(processor, settings)

    async def api_error(request: Request, error: ApiError) -> Response:
        return error.response()

    async def http_error(request: Request, error: HTTPException) -> Response:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {error.detail}"
        return ApiError(error.status_code, message, kind=kind).response()

    async def server_error(request: Request, error: Exception) -> Response:
        return ApiError(500, "The server failed on this request.", kind="server_error").response()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        api.worker = BatchWorker(
            model, processor, max_rows=max_rows, prompt_cache=cache, context_length=context
        )
        app.state.worker = api.worker
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(api.worker.close)

    routes = [
        Route("/health", api.health),
        Route("/v1/models", api.models),
        Route("/v1/models/{name:path}", api.retrieve_model),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


def _require_web_stack() -> None:
    if _missing_dependency is not None:
        raise Lfm2VlError(
            f"The server needs Starlette and uvicorn ({_missing_dependency}): "
            "pip install 'mlx-lfm2vl[server]'"
        )


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def _cli():
    import click

    from .cli_options import command, max_rows_option, max_tokens_option, model_option
    from .generate import DEFAULT_MODEL

    @command()
    @model_option(DEFAULT_MODEL, "; also the model name clients send")
    @click.option(
        "--host",
        default=DEFAULT_HOST,
        show_default=True,
        help="Address to listen on. Anything but 127.0.0.1 lets other machines in: set "
        "--api-key then.",
    )
    @click.option(
        "--port",
        type=click.IntRange(0, 65535),
        default=DEFAULT_PORT,
        show_default=True,
        help="Port to listen on (0: a free one, which the log names).",
    )
    @click.option(
        "--api-key",
        envvar="MLX_LFM2VL_API_KEY",
        default=None,
        help="Require 'Authorization: Bearer KEY' on /v1/ requests (or set MLX_LFM2VL_API_KEY, "
        "which other users cannot read from the process list).",
    )
    @click.option(
        "--allow-local-files",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        metavar="DIR",
        help="Let requests name image files (paths or file:// URLs) inside DIR. Off by default.",
    )
    @max_rows_option(DEFAULT_MAX_ROWS, "Requests decoded together; more wait for a free row.")
    @click.option(
        "--prompt-cache-mb",
        type=click.FloatRange(min=0),
        default=DEFAULT_PROMPT_CACHE_MB,
        show_default=True,
        help="Memory for cached conversation prefixes (a next turn prefills only what is new); "
        "0 turns reuse off.",
    )
    @click.option(
        "--max-images",
        type=click.IntRange(min=0),
        default=DEFAULT_MAX_IMAGES,
        show_default=True,
        help="Most images in one request (a conversation resends earlier turns' images).",
    )
    @click.option(
        "--max-context",
        type=click.IntRange(min=2),
        default=None,
        help="Most tokens of prompt + answer. Default: the model's max_position_embeddings.",
    )
    @max_tokens_option(
        DEFAULT_MAX_TOKENS,
        "Answer length for requests that set no max_tokens / max_completion_tokens.",
    )
    @click.option(
        "--max-body-mb",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULT_MAX_BODY_MB,
        show_default=True,
        help="Largest request body (images sent as data: URLs count).",
    )
    @click.option(
        "--log-level",
        type=click.Choice(["critical", "error", "warning", "info", "debug"]),
        default="info",
        show_default=True,
    )
    def cli(
        model: str,
        host: str,
        port: int,
        api_key: str | None,
        allow_local_files: Path | None,
        max_rows: int,
        prompt_cache_mb: float,
        max_images: int,
        max_context: int | None,
        max_tokens: int,
        max_body_mb: float,
        log_level: str,
    ) -> None:
        """Serve an LFM2-VL model over an OpenAI-compatible API (/v1/chat/completions).

        \b
        Example:
          python -m mlx_lfm2vl.server --model LiquidAI/LFM2-VL-450M --port 8080
        """
        from . import load

        _require_web_stack()
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            click.echo(
                f"warning: listening on {host} without --api-key: anyone who reaches this "
                "port can use the model",
                err=True,
            )
        click.echo(f"loading {model} ...", err=True)
        loaded_model, processor = load(model)
        settings = ServerSettings(
            model_id=model,
            api_key=api_key or None,
            allowed_folder=allow_local_files.resolve() if allow_local_files else None,
            max_images=max_images,
            max_body_bytes=int(max_body_mb * (1 << 20)),
            max_tokens=max_tokens,
            context_length=max_context,
        )
        app = create_app(
            loaded_model,
            processor,
            settings,
            max_rows=max_rows,
            prompt_cache_mb=prompt_cache_mb,
        )
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=log_level,
            ws="none",
            timeout_graceful_shutdown=5,
        )

    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (arguments from `sys.argv` when None); returns the exit code. User
    errors print one line on stderr."""
    from .cli_options import run_command

    return run_command(_cli(), argv, "python -m mlx_lfm2vl.server", interrupted="stopped")


def run() -> None:
    """The program (`python -m mlx_lfm2vl.server`, the `mlx-lfm2vl-server` script): on Linux it
    first relaunches itself with a fast BLAS preloaded (`cpu.blas`)."""
    from . import relaunch_with_fast_blas

    relaunch_with_fast_blas()
    sys.exit(main())


if __name__ == "__main__":
    # Run the package's copy of this module, not this second `__main__` copy, so there is one
    # set of classes.
    from mlx_lfm2vl.server import run

    run()
