"""Structured output: constrained decoding, so that an answer is JSON that fits a schema.

A JSON schema becomes a grammar (llguidance, a maintained Rust library from the Guidance
project) and the grammar a logits processor: before each token is sampled, every token the
grammar does not allow next gets -inf, so greedy and sampled decoding alike can only write text
the grammar accepts. The end-of-sequence token is allowed only once the JSON is complete, and
then it is the only token allowed, so a constrained answer stops right after the JSON. Ids the
tokenizer does not have (the LM head is wider than the vocabulary: 65536 logits for 64400 ids)
and special tokens are never allowed.

What is paid when:

- once per tokenizer (cached): llguidance's view of the vocabulary, a token trie (~0.3 s at
  64400 ids);
- once per schema and tokenizer (cached): the compiled grammar (~1 ms; the first of a process
  ~20 ms);
- per request: a copy of the compiled matcher (microseconds);
- per token: the mask (tens of microseconds to a millisecond), computed while the device runs
  the forward pass whose logits it will mask (`mx.async_eval` first), then unpacked and
  applied with one `mx.where`.

Why llguidance (benchmarks/bench_constrained.py, results in benchmarks/results_constrained.md):
of the three maintained libraries measured it alone gave valid JSON fitting the schema in every
run (xgrammar let raw control characters into strings; outlines-core ignored integer bounds),
it compiles a schema in about a millisecond (outlines-core indexes the whole vocabulary per
schema: 0.2-8 s at 64400 ids), and it depends on nothing (xgrammar requires and imports torch).
Its mask costs 0.02-0.11 ms a token at 64400 ids, ~0.2% of a 450M decode step.

The JSON is written in one line with `", "` and `": "` between items (as `json.dumps`): no free
whitespace, which a model can otherwise emit without end. A schema may choose otherwise with
llguidance's `"x-guidance"` key, e.g. `{"x-guidance": {"whitespace_flexible": true}, ...}`.
Properties come in the order of the schema's `properties`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import mlx.core as mx
import numpy as np

from .errors import Lfm2VlError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# A JSON schema, or ANY_OBJECT for any JSON object (OpenAI's "json_object" response format).
JsonSchema = Mapping[str, Any] | str
ANY_OBJECT = "object"

# Defaults a schema's "x-guidance" key may override.
_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Short messages: the default ones append the parser's state and the whole grammar.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)
_NEG_INF = float("-inf")


class _Vocabulary:
    """llguidance's view of one tokenizer, and the schemas compiled for it."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...]):
        # Ids may have gaps (specials at the top of the id range): the mask covers them all.
        self.size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer.to_str(),
            n_vocab=self.size,
            eos_token=list(eos_token_ids),
            slices=llguidance.LLTokenizer.json_slices(),
        )
        self.compile = functools.lru_cache(maxsize=64)(self._compile)

    def _compile(self, schema_text: str) -> llguidance.LLMatcher:
        """A matcher at the start of the grammar, never advanced: requests copy it."""
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text, defaults=_FORMAT)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=_LIMITS)
        if matcher.is_error():
            raise Lfm2VlError(
                f"json_schema cannot be used: {matcher.get_error()}. Fix the schema (the "
                "keywords supported are listed in llguidance's JSON schema notes)"
            )
        return matcher


@functools.lru_cache(maxsize=8)
def _vocabulary(tokenizer: Tokenizer, eos_token_ids: tuple[int, ...]) -> _Vocabulary:
    return _Vocabulary(tokenizer, eos_token_ids)


def _schema_text(json_schema: JsonSchema) -> str:
    if isinstance(json_schema, str):
        if json_schema != ANY_OBJECT:
            raise Lfm2VlError(
                f"json_schema must be a JSON schema (a dict) or {ANY_OBJECT!r} for any JSON "
                f"object, got the string {json_schema!r}: pass the schema itself, e.g. "
                "json.loads(text)"
            )
        json_schema = {"type": "object"}
    if not isinstance(json_schema, Mapping):
        raise Lfm2VlError(
            f"json_schema must be a JSON schema (a dict) or {ANY_OBJECT!r} for any JSON object, "
            f"got {type(json_schema).__name__}"
        )
    try:
        return json.dumps(json_schema)  # key order kept: it is the order of the properties
    except (TypeError, ValueError) as e:
        raise Lfm2VlError(
            f"json_schema is not JSON data ({e}): pass plain dicts, lists, strings and numbers"
        ) from None


class JsonConstraint:
    """One request's logits processor (tokens, logits) -> logits that keeps its answer JSON
    fitting a schema (see the module docstring); made by `json_constraint`.

    `tokens` is the history the port's processors see: the prompt ids, then every sampled
    token. The prompt's length is taken from the first call (or given), and each later call
    advances the grammar with the tokens sampled since. Not reusable across requests.
    """

    def __init__(
        self, matcher: llguidance.LLMatcher, vocabulary_size: int, prompt_length: int | None = None
    ):
        self._matcher = matcher
        self._size = vocabulary_size
        self._consumed = prompt_length

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # Queue the history (its last token is being sampled) and then the forward pass that
        # needs that token; read the history as soon as it is there and compute the mask while
        # the forward pass runs. Reading it through a new op (a slice) would queue that op
        # behind the forward pass and wait for all of it.
        mx.async_eval(tokens, logits)
        history = np.asarray(tokens)
        if self._consumed is None:
            self._consumed = history.size
        if history.size > self._consumed:
            new = history[self._consumed :].tolist()
            self._consumed = history.size
            # A stopped matcher has seen the whole JSON: what follows is the end-of-sequence
            # token, which the decode loop may pass here before it ends the answer.
            if not self._matcher.is_stopped() and not self._matcher.consume_tokens(new):
                raise Lfm2VlError(
                    f"a token the JSON grammar forbids was sampled ({self._matcher.get_error()}): "
                    "another logits processor must have ruled out every token the grammar "
                    "allows; remove it from this request"
                )
        bits = np.frombuffer(self._matcher.compute_bitmask(), np.uint8)
        # One bit per id, little-endian within each 32-bit word. Ids past the tokenizer's (the
        # LM head is wider) stay False, whatever the padding bits of the last word say.
        allowed = np.zeros(logits.shape[-1], np.bool_)
        n = min(self._size, allowed.size)
        allowed[:n] = np.unpackbits(bits, count=n, bitorder="little").view(np.bool_)
        return mx.where(mx.array(allowed), logits, _NEG_INF)


def json_constraint(
    tokenizer: Tokenizer,
    eos_token_ids: Sequence[int],
    json_schema: JsonSchema,
    prompt_length: int | None = None,
) -> JsonConstraint:
    """A logits processor for one request whose answer must be JSON fitting `json_schema`:
    a JSON schema as a dict, or "object" for any JSON object.

    `eos_token_ids` end the answer; they are allowed exactly when the JSON is complete.
    `prompt_length` is the number of history tokens before the answer (default: all the tokens
    of the first call). The grammar is compiled once per tokenizer and schema; a schema that
    cannot be compiled raises `Lfm2VlError` with llguidance's message.
    """
    schema_text = _schema_text(json_schema)
    vocabulary = _vocabulary(tokenizer, tuple(eos_token_ids))
    matcher = vocabulary.compile(schema_text).deep_copy()
    return JsonConstraint(matcher, vocabulary.size, prompt_length)
