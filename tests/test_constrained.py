"""Structured output (`mlx_lfm2vl/constrained.py`): answers constrained to JSON fitting a schema.

The fixture models have random weights, so nothing but the constraint makes their answers JSON:
the 450M-like fixture mostly picks ids the small tokenizer does not have (they decode to
nothing), the talking one writes random text. Every answer must end with the end-of-sequence
token right after the JSON, parse, and fit its schema, greedy or sampled.

The schemas bound every string, array and integer, so the JSON they allow is finite and a random
model reaches its end. "Any JSON object" has no bound: a random model would write one string
forever, so those requests add a processor that prefers closing tokens more at every step, as a
model that wants to finish would; it runs before the constraint, which alone makes the JSON
valid (without the mask no answer here is JSON).
"""

from __future__ import annotations

import json
import re

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from reference import random_image

from mlx_lfm2vl import Lfm2VlError, generate, load, stream_generate
from mlx_lfm2vl.batch import BatchEngine, batch_generate
from mlx_lfm2vl.constrained import json_constraint

MAX_TOKENS = 200

SCHEMAS = {
    "fields": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "animal": {"enum": ["cat", "dog", "bird"]},
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 8},
                "maxItems": 3,
            },
        },
        "required": ["name", "age", "animal", "tags"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "cat": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 8},
                    "colour": {"enum": ["black", "white", "ginger"]},
                },
                "required": ["name", "colour"],
                "additionalProperties": False,
            },
            "where": {
                "type": "object",
                "properties": {
                    "on": {"enum": ["mat", "table"]},
                    "count": {"type": "integer", "minimum": 1, "maximum": 9},
                    "ok": {"type": "boolean"},
                },
                "required": ["on", "count", "ok"],
                "additionalProperties": False,
            },
        },
        "required": ["cat", "where"],
        "additionalProperties": False,
    },
    "json_object": "object",
}
DECODING = {
    "greedy": {"temperature": 0.0},
    "seed-0": {"temperature": 1.0, "seed": 0},
    "seed-1": {"temperature": 1.0, "seed": 1},
    "seed-2": {"temperature": 1.0, "seed": 2},
}


@pytest.fixture(scope="module")
def talking(talking_checkpoint):
    return load(talking_checkpoint)


@pytest.fixture(scope="module")
def random_450m(checkpoint_450m):
    return load(checkpoint_450m)


def prefer_closing(tokenizer, step: float = 0.1):
    """A processor adding n x `step` to the logits of `}` and `]`, and twice that to `"`, at
    the n-th token of the answer (with or without a space before them). `"` gets more, as `}`
    and `]` can also go inside a string."""
    weight = {'"': 2.0, "}": 1.0, "]": 1.0}
    texts = {i: tokenizer.decode([i]).strip() for i in tokenizer.get_vocab().values()}
    chosen = {i: weight[text] for i, text in texts.items() if text in weight}
    ids, weights = mx.array(list(chosen)), mx.array(list(chosen.values()))
    start = None

    def prefer(tokens: mx.array, logits: mx.array) -> mx.array:
        nonlocal start
        start = tokens.size if start is None else start
        return logits.at[:, ids].add(weights * ((tokens.size - start) * step))

    return prefer


def options(processor, schema_name: str, decoding: str) -> dict:
    extra = {}
    if SCHEMAS[schema_name] == "object":
        extra["logits_processors"] = [prefer_closing(processor.tokenizer)]
    return {
        "json_schema": SCHEMAS[schema_name],
        "max_tokens": MAX_TOKENS,
        **DECODING[decoding],
        **extra,
    }


def assert_json_fits(result, processor, schema_name: str) -> None:
    assert result.finish_reason == "stop", (result.finish_reason, result.text)
    assert result.tokens[-1] in processor.eos_token_ids
    value = json.loads(result.text)
    schema = SCHEMAS[schema_name]
    jsonschema.validate(value, {"type": "object"} if schema == "object" else schema)


@pytest.mark.parametrize("decoding", DECODING)
@pytest.mark.parametrize("schema_name", SCHEMAS)
@pytest.mark.parametrize("model_name", ["talking", "random_450m"])
def test_answers_are_json_that_fits_the_schema_greedy_and_sampled(
    request, model_name, schema_name, decoding
):
    model, processor = request.getfixturevalue(model_name)
    result = generate(
        model, processor, "Describe the cat as JSON.", **options(processor, schema_name, decoding)
    )
    assert_json_fits(result, processor, schema_name)


@pytest.mark.parametrize("decoding", ["greedy", "seed-1"])
@pytest.mark.parametrize("schema_name", ["fields", "json_object"])
def test_an_answer_about_an_image_is_json_that_fits_the_schema(talking, schema_name, decoding):
    model, processor = talking
    result = generate(
        model,
        processor,
        "Describe this image as JSON.",
        [random_image(256, 384, seed=1)],
        **options(processor, schema_name, decoding),
    )
    assert result.stats.image_tokens > 0
    assert_json_fits(result, processor, schema_name)


def test_streamed_text_is_the_json_and_the_last_chunk_says_stop(talking):
    model, processor = talking
    chunks = list(
        stream_generate(model, processor, "A cat.", **options(processor, "nested", "seed-2"))
    )
    jsonschema.validate(json.loads("".join(c.text for c in chunks)), SCHEMAS["nested"])
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "stop"


def test_batch_rows_with_and_without_schemas_are_what_each_gives_alone(talking):
    model, processor = talking
    requests = [
        {"prompt": "Tell me a story about a cat.", "max_tokens": 24},
        {"prompt": "The cat as JSON.", **options(processor, "fields", "greedy")},
        {"prompt": "Numbers: 1 2 3", "max_tokens": 24, "temperature": 1.0, "seed": 7},
        {"prompt": "Describe this image.", "images": [random_image(256, 384, seed=1)]},
        {"prompt": "Anything as JSON.", **options(processor, "json_object", "seed-1")},
        {"prompt": "The scene as JSON.", **options(processor, "nested", "seed-2")},
    ]
    requests[3].update(options(processor, "nested", "seed-0"))
    results = batch_generate(model, processor, requests, temperature=0.0)
    for request, result in zip(requests, results, strict=True):
        request = {"temperature": 0.0, **request}
        prompt, images = request.pop("prompt"), request.pop("images", None)
        alone = generate(model, processor, prompt, images, **request)
        assert result.tokens == alone.tokens, prompt
        assert result.finish_reason == alone.finish_reason
        if "json_schema" in request:
            schema_name = next(k for k, v in SCHEMAS.items() if v == request["json_schema"])
            assert_json_fits(result, processor, schema_name)


def test_an_answer_cut_by_max_tokens_finishes_with_length(talking):
    model, processor = talking
    result = generate(
        model,
        processor,
        "The cat as JSON.",
        json_schema=SCHEMAS["fields"],
        max_tokens=5,
        temperature=0.0,
    )
    assert result.finish_reason == "length"
    assert len(result.tokens) == 5
    assert result.text.startswith('{"name": "'[: len(result.text)])
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "strin"}, "Invalid type: strin"),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum (5) is greater than maximum"),
        ({"type": "string", "format": "no-such-format"}, "Unknown format: no-such-format"),
        ({"$ref": "#/$defs/missing"}, "does not exist"),
        ({"type": "object", "default": {1, 2}}, "not JSON data"),
        ("json", "or 'object' for any JSON object"),
        (["object"], "got list"),
    ],
)
def test_a_schema_that_cannot_be_compiled_is_refused_before_any_work(talking, schema, message):
    model, processor = talking
    with pytest.raises(Lfm2VlError, match=re.escape(message)):
        generate(model, processor, "Hi", json_schema=schema)
    engine = BatchEngine(model, processor)
    with pytest.raises(Lfm2VlError, match=re.escape(message)):
        engine.submit("Hi", json_schema=schema)
    assert not engine.busy


def test_the_mask_allows_only_the_grammar_and_eos_only_at_the_end(talking):
    _, processor = talking
    tokenizer, eos = processor.tokenizer, processor.eos_token_ids
    constraint = json_constraint(tokenizer, eos, SCHEMAS["fields"])
    vocabulary = max(tokenizer.get_vocab().values()) + 1
    prompt = mx.array([1, 2, 3], mx.int32)
    width = 65536  # the LM head is wider than the tokenizer's ids

    def allowed(history: mx.array) -> np.ndarray:
        logits = constraint(history, mx.zeros((1, width)))
        return np.flatnonzero(np.isfinite(np.array(logits[0])))

    first = allowed(prompt)
    assert len(first) > 0 and first.max() < vocabulary
    assert all(tokenizer.decode([int(i)]).startswith("{") for i in first)
    answer = tokenizer.encode('{"name": "Tom", "age": 7, "animal": "cat", "tags": ["a"]}').ids
    history = prompt
    for token in answer:
        assert not set(eos) & set(allowed(history).tolist())
        assert token in allowed(history)
        history = mx.concatenate([history, mx.array([token], mx.int32)])
    assert set(allowed(history).tolist()) == set(eos)


def test_a_prompt_length_given_up_front_counts_the_tokens_of_the_first_call_as_answer(talking):
    _, processor = talking
    tokenizer, eos = processor.tokenizer, processor.eos_token_ids
    brace = tokenizer.token_to_id("{")
    history = mx.array([1, 2, 3, brace], mx.int32)
    constraint = json_constraint(tokenizer, eos, "object", prompt_length=3)
    logits = constraint(history, mx.zeros((1, 65536)))
    allowed = {tokenizer.decode([int(i)]) for i in np.flatnonzero(np.isfinite(np.array(logits)))}
    assert allowed == {'"', "}"}  # after "{": a key or the end of the object


def test_a_second_request_reuses_the_compiled_grammar(talking):
    from mlx_lfm2vl.constrained import _vocabulary

    _, processor = talking
    tokenizer, eos = processor.tokenizer, processor.eos_token_ids
    json_constraint(tokenizer, eos, SCHEMAS["nested"])
    compiled = _vocabulary(tokenizer, tuple(eos)).compile
    before = compiled.cache_info()
    json_constraint(tokenizer, eos, SCHEMAS["nested"])
    after = compiled.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)
