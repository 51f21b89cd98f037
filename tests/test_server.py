"""The OpenAI-compatible server (`mlx_lfm2vl/server.py`), through the real `openai` client.

A live server on a free port of 127.0.0.1 (uvicorn in a thread of this process, shut down after
the module) serves the fixture checkpoint that writes text. Greedy answers through it must
equal the library's `generate` on the same request: alone, with images, with 32 requests from
8 clients at once, next to a client that leaves mid-stream, and on a conversation's second turn
that reuses the first from the prompt cache. The error cases check OpenAI's error shape and
status. The command line itself is started once, in a subprocess.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import uvicorn
from reference import random_image

from mlx_lfm2vl import generate, load, stream_generate
from mlx_lfm2vl.server import (
    ApiError,
    ServerSettings,
    create_app,
    read_image,
)

KEY = "test-key-0123"
MODEL = "lfm2-test"
CONTEXT = 600
TIMEOUT = 60  # seconds, for every client call
# float32 rounding of batched matmuls (tests/test_batch.py)
LOGPROB_TOLERANCE = 2e-4


class LiveServer:
    """uvicorn serving `app` on a free port of 127.0.0.1, in a thread, until `close()`."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", ws="none", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def raw_request(port: int, method: str, path: str, body: bytes = b"", headers=None):
    """(status, parsed JSON body) of one plain HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def library_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as the library takes them (image parts become {"type": "image"})."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image"} if part["type"] == "image_url" else part for part in content
            ]
        out.append({"role": message["role"], "content": content})
    return out


@pytest.fixture(scope="module")
def loaded(talking_checkpoint):
    return load(talking_checkpoint)


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    """A folder the server may read images from, a secret image beside it and a symlink out."""
    root = tmp_path_factory.mktemp("files")
    folder = root / "allowed"
    folder.mkdir()
    random_image(64, 96, seed=5).save(folder / "photo.png")
    random_image(64, 64, seed=6).save(root / "secret.png")
    (folder / "link.png").symlink_to(root / "secret.png")
    return folder.resolve()


@pytest.fixture(scope="module")
def server(loaded, allowed):
    model, processor = loaded
    settings = ServerSettings(
        model_id=MODEL,
        api_key=KEY,
        allowed_folder=allowed,
        max_images=3,
        max_body_bytes=1 << 20,
        max_tokens=8,
        context_length=CONTEXT,
    )
    live = LiveServer(create_app(model, processor, settings, max_rows=8, prompt_cache_mb=64))
    yield live
    live.close()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


def _app(server):
    return server.server.config.app


def ask(client, messages, **options):
    options = {"model": MODEL, "temperature": 0, "max_tokens": 6, **options}
    return client.chat.completions.create(messages=messages, **options)


def alone(loaded, messages, images=(), **options):
    model, processor = loaded
    options = {"temperature": 0.0, "max_tokens": 6, **options}
    return generate(model, processor, library_messages(messages), list(images), **options)


# ---------------------------------------------------------------- answers


def test_models_lists_the_one_model_and_health_needs_no_key(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert raw_request(server.port, "GET", "/health") == (200, {"status": "ok", "model": MODEL})


def test_a_greedy_answer_with_a_system_message_equals_the_librarys(loaded, client):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Describe the city street at night."},
    ]
    want = alone(loaded, messages)
    response = ask(client, messages)
    choice = response.choices[0]
    assert choice.message.content == want.text and choice.message.role == "assistant"
    assert choice.finish_reason == want.finish_reason == "length"
    assert response.usage.prompt_tokens == want.stats.prompt_tokens
    assert response.usage.completion_tokens == len(want.tokens) == 6
    assert response.usage.total_tokens == want.stats.prompt_tokens + 6
    assert response.model == MODEL and response.id.startswith("chatcmpl-")


def test_a_streamed_answer_is_the_same_text_with_usage_last(loaded, client):
    messages = [{"role": "user", "content": "How many apples are on the table?"}]
    want = alone(loaded, messages, max_tokens=7)
    chunks = list(
        ask(client, messages, max_tokens=7, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_data_url_images_one_and_two_answer_as_the_library(loaded, client):
    images = [random_image(80, 120, seed=1), random_image(120, 80, seed=2)]
    one = [{"role": "user", "content": [image_part(data_url(images[0])), _text("What is it?")]}]
    two = [
        {
            "role": "user",
            "content": [
                image_part(data_url(images[0])),
                _text("Compare it with"),
                image_part(data_url(images[1])),
            ],
        }
    ]
    for messages, sent in ((one, images[:1]), (two, images)):
        want = alone(loaded, messages, sent)
        response = ask(client, messages)
        assert response.choices[0].message.content == want.text
        assert response.usage.prompt_tokens == want.stats.prompt_tokens
        assert want.stats.image_tokens >= 64 * len(sent)


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def test_logprobs_are_the_models_with_the_top_alternatives(loaded, client):
    model, processor = loaded
    messages = [{"role": "user", "content": "Numbers: 1 2 3"}]
    chunks = list(
        stream_generate(model, processor, library_messages(messages), temperature=0.0, max_tokens=4)
    )
    response = ask(client, messages, max_tokens=4, logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == 4
    for entry, chunk in zip(entries, chunks, strict=True):
        want = np.array(chunk.logprobs)
        assert abs(entry.logprob - want[chunk.token]) <= LOGPROB_TOLERANCE
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the top token
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            [t.logprob for t in entry.top_logprobs], reverse=True
        )
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    text = bytes(b for e in entries for b in e.bytes).decode("utf-8", "replace")
    assert text == response.choices[0].message.content
    streamed = list(ask(client, messages, max_tokens=4, logprobs=True, stream=True))
    tokens = [
        e.token for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert tokens == [e.token for e in entries]


def test_response_format_json_schema_answers_always_parse_and_validate(client):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
            "cat": {"type": "boolean"},
        },
        "required": ["colour", "count", "cat"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    messages = [{"role": "user", "content": "Describe the picture as JSON."}]
    for seed in (0, 1, 2):
        reply = ask(
            client,
            messages,
            max_tokens=60,
            temperature=1.0,
            seed=seed,
            response_format=response_format,
        )
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
        assert reply.choices[0].finish_reason == "stop"
    # Any object: a random model rarely closes a free string, so the answer may be cut at
    # max_tokens; it is JSON when it ends, and an object from its first character.
    reply = ask(client, messages, max_tokens=60, response_format={"type": "json_object"})
    content, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert content.startswith("{")
    assert finish == "length" or isinstance(json.loads(content), dict)


def test_local_image_files_are_read_only_inside_the_allowed_folder(loaded, client, allowed):
    photo = random_image(64, 96, seed=5)
    want = ask(client, [{"role": "user", "content": [image_part(data_url(photo)), _text("Hi")]}])
    for url in ("photo.png", str(allowed / "photo.png"), (allowed / "photo.png").as_uri()):
        response = ask(client, [{"role": "user", "content": [image_part(url), _text("Hi")]}])
        assert response.choices[0].message.content == want.choices[0].message.content
    for url in ("../secret.png", str(allowed.parent / "secret.png"), "link.png", "/etc/passwd"):
        with pytest.raises(openai.PermissionDeniedError, match="outside the folder"):
            ask(client, [{"role": "user", "content": [image_part(url), _text("Hi")]}])
    settings = ServerSettings(model_id=MODEL)  # no --allow-local-files
    with pytest.raises(ApiError, match="--allow-local-files") as error:
        read_image("messages[0].content[0]", str(allowed / "photo.png"), settings)
    assert error.value.status == 400


# ---------------------------------------------------------------- errors


def assert_error(error: openai.APIStatusError, status: int, *needles: str, code=None) -> None:
    assert error.status_code == status
    body = error.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert code is None or body["code"] == code
    for needle in needles:
        assert needle in body["message"], body


def test_errors_come_in_openais_shape_with_the_right_status(server, client):
    user = [{"role": "user", "content": "Hi"}]

    def fails(status: int, *needles: str, code=None, **request):
        with pytest.raises(openai.APIStatusError) as caught:
            ask(client, **{"messages": user, **request})
        assert_error(caught.value, status, *needles, code=code)

    fails(404, "does not exist", code="model_not_found", model="gpt-4o")
    not_png = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    fails(400, "Cannot decode", code="invalid_image", messages=_with(not_png))
    fails(400, "base64", messages=_with("data:image/png;base64,@@@"))
    fails(400, "Cannot download", messages=_with("http://127.0.0.1:9/missing.png"))
    small = data_url(random_image(32, 32))
    fails(400, "at most 3", code="too_many_images", messages=_with(*[small] * 4))
    fails(400, "context of 600", code="context_length_exceeded", messages=_long_prompt())
    fails(
        413, "--max-body-mb", code="request_too_large", messages=_with("data:," + "A" * (2 << 20))
    )
    fails(400, "'temperature'", temperature=-1)
    fails(400, "top_logprobs", top_logprobs=3)
    fails(400, "response_format", response_format={"type": "xml"})
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
    fails(400, "strin", response_format=bad_schema)

    for headers, needle in (
        ({}, "Missing API key"),
        ({"Authorization": "Bearer wrong"}, "Incorrect"),
    ):
        status, body = raw_request(server.port, "GET", "/v1/models", headers=headers)
        assert status == 401 and needle in body["error"]["message"]
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=user)

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, body = raw_request(server.port, "POST", "/v1/chat/completions", b"{not json", headers)
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = raw_request(
        server.port, "POST", "/v1/chat/completions", b"x" * (2 << 20), headers
    )
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = raw_request(server.port, "GET", "/v1/nowhere", headers=headers)
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def _with(*urls: str) -> list[dict]:
    return [{"role": "user", "content": [*(image_part(u) for u in urls), _text("Hi")]}]


def _long_prompt() -> list[dict]:
    return [{"role": "user", "content": " ".join(["apples"] * CONTEXT)}]


# ---------------------------------------------------------------- many clients


def test_32_requests_from_8_clients_each_get_their_own_answer(loaded, client):
    subjects = [
        "cats",
        "apples",
        "a city street",
        "numbers",
        "the table",
        "a fox",
        "a pear",
        "dogs",
    ]
    requests = [
        ([{"role": "user", "content": f"Tell me about {subjects[i % 8]}, part {i}."}], 2 + i % 5)
        for i in range(32)
    ]
    want = [alone(loaded, messages, max_tokens=n).text for messages, n in requests]

    def one(index: int) -> str:
        messages, n = requests[index]
        if index % 2:  # half of them streamed
            chunks = ask(client, messages, max_tokens=n, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        return ask(client, messages, max_tokens=n).choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(one, range(32), timeout=300))
    assert got == want


@pytest.fixture
def recorded(server, monkeypatch):
    """The server's engine, with the ids it is asked to cancel and how each request ended."""
    engine = _app(server).state.worker.engine
    cancelled, endings, seen = [], {}, set()
    cancel, step = engine.cancel, engine.step

    def recording_step():
        events = step()
        seen.update(i for i, _ in events)
        endings.update({i: c.finish_reason for i, c in events if c.finish_reason})
        return events

    monkeypatch.setattr(engine, "cancel", lambda i: cancelled.append(i) or cancel(i))
    monkeypatch.setattr(engine, "step", recording_step)
    return engine, cancelled, endings, seen


def wait_until_idle(engine) -> None:
    deadline = time.monotonic() + 30
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.busy


def test_a_client_that_leaves_mid_stream_frees_its_row_and_disturbs_no_one(
    loaded, client, recorded
):
    engine, cancelled, endings, _ = recorded
    others = [[{"role": "user", "content": f"Count the apples, {i}."}] for i in range(3)]
    want = [alone(loaded, messages, max_tokens=12).text for messages in others]

    leaving = ask(
        client, [{"role": "user", "content": "A very long story."}], max_tokens=10**6, stream=True
    )
    next(iter(leaving))
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(ask, client, m, max_tokens=12) for m in others]
        time.sleep(0.2)
        leaving.close()  # the connection goes; the server cancels the request
        got = [f.result(timeout=TIMEOUT).choices[0].message.content for f in futures]
    assert got == want
    wait_until_idle(engine)
    # The server cancelled it rather than decode its ~580 tokens for nobody.
    assert len(cancelled) == 1 and endings[cancelled[0]] == "cancelled"


def test_a_client_that_leaves_before_its_whole_answer_is_cancelled(server, recorded):
    engine, cancelled, endings, seen = recorded
    body = {"model": MODEL, "messages": [{"role": "user", "content": "A long one."}]}
    body = json.dumps({**body, "max_tokens": 10**6, "temperature": 0}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
    deadline = time.monotonic() + TIMEOUT
    while not seen:  # decoding: the request is in the engine
        assert time.monotonic() < deadline
        time.sleep(0.01)
    connection.close()
    wait_until_idle(engine)
    assert cancelled == list(seen) and endings[cancelled[0]] == "cancelled"


# ---------------------------------------------------------------- prompt reuse


def test_a_second_turn_sent_in_full_reuses_the_first_and_equals_a_cold_run(loaded, client):
    image = random_image(96, 64, seed=11)
    first = [{"role": "user", "content": [image_part(data_url(image)), _text("Describe it.")]}]
    answer = ask(client, first, max_tokens=5)
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    second = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "And the colours?"},
    ]
    response = ask(client, second, max_tokens=5)
    cold = alone(loaded, second, [image], max_tokens=5)
    assert response.choices[0].message.content == cold.text
    # The first request is reused up to its last special token, the <|im_start|> before
    # "assistant\n": the image and the first turn are neither encoded nor prefilled again.
    processor = loaded[1]
    first_ids = processor.process(library_messages(first), [image]).input_ids
    im_start = processor.tokenizer.token_to_id("<|im_start|>")
    reusable = int(np.flatnonzero(first_ids == im_start)[-1]) + 1
    assert processor.decode(first_ids[reusable:]) == "assistant\n"
    cached = response.usage.prompt_tokens_details.cached_tokens
    assert cached == reusable
    prefilled = response.usage.prompt_tokens - cached
    assert prefilled == cold.stats.prompt_tokens - reusable < cold.stats.prompt_tokens / 2


# ---------------------------------------------------------------- the command line


def test_the_command_line_serves_on_localhost_and_wants_its_key(talking_checkpoint, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "MLX_LFM2VL_API_KEY": "cli-key"}
    command = [sys.executable, "-m", "mlx_lfm2vl.server", "--model", str(talking_checkpoint)]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if raw_request(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert raw_request(port, "GET", "/v1/models")[0] == 401
        status, body = raw_request(
            port, "GET", "/v1/models", headers={"Authorization": "Bearer cli-key"}
        )
        assert status == 200 and body["data"][0]["id"] == str(talking_checkpoint)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
