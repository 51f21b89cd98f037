"""Samplers and logits processors, with the reference's semantics and order.

`transformers` applies the repetition penalty first (a logits processor, also under greedy
decoding), then, only when sampling, the warpers in this order: temperature, top-k, top-p, min-p
(min-p after temperature, on the already filtered distribution). Each function below follows the
matching reference class (`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`), including how ties and the
"keep at least one token" rule are handled.

They are written here, not imported from `mlx_lm.sample_utils`, because importing any part of
`mlx_lm` runs its package `__init__`, which imports `transformers` and `torch` (seconds at start).

Shapes: logits are (B, vocab) float32; token histories are 1-D int arrays. A sampler takes logits
and a PRNG key and returns (B,) token ids, so a seeded run never touches MLX's global PRNG.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import mlx.core as mx

from .errors import Lfm2VlError

Sampler = Callable[[mx.array, mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

_NEG_INF = float("-inf")


def apply_repetition_penalty(logits: mx.array, tokens: mx.array, penalty: float) -> mx.array:
    """Divide positive logits, multiply negative ones, of every token id in `tokens`."""
    if tokens.size == 0:
        return logits
    index = mx.broadcast_to(tokens.reshape(1, -1), (logits.shape[0], tokens.size))
    selected = mx.take_along_axis(logits, index, axis=-1)
    selected = mx.where(selected < 0, selected * penalty, selected / penalty)
    # Repeated ids write the same value, so duplicates in the history are harmless.
    return mx.put_along_axis(logits, index, selected, axis=-1)


def apply_temperature(logits: mx.array, temperature: float) -> mx.array:
    return logits / temperature


def apply_top_k(logits: mx.array, top_k: int) -> mx.array:
    """Keep tokens whose logit is at least the k-th largest (ties at the threshold stay)."""
    k = min(top_k, logits.shape[-1])
    threshold = mx.min(mx.topk(logits, k, axis=-1), axis=-1, keepdims=True)
    return mx.where(logits < threshold, _NEG_INF, logits)


def apply_top_p(logits: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability mass reaches `top_p`.

    As the reference: sort ascending, drop tokens while the cumulative mass from the bottom is
    <= 1 - top_p, and always keep the most likely token.
    """
    order = mx.argsort(logits, axis=-1)
    cumulative = mx.cumsum(mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
    remove_sorted = cumulative <= 1 - top_p
    keep_last = mx.arange(logits.shape[-1]) == logits.shape[-1] - 1
    remove_sorted = mx.logical_and(remove_sorted, mx.logical_not(keep_last))
    remove = mx.put_along_axis(mx.zeros(logits.shape, mx.bool_), order, remove_sorted, axis=-1)
    return mx.where(remove, _NEG_INF, logits)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below `min_p` times the top token's probability."""
    probs = mx.softmax(logits, axis=-1)
    threshold = min_p * mx.max(probs, axis=-1, keepdims=True)
    # The top token always passes (p_max >= min_p * p_max for min_p <= 1), so one token stays.
    return mx.where(probs < threshold, _NEG_INF, logits)


def _check(temperature: float, top_p: float, top_k: int, min_p: float) -> None:
    # Written so that NaN fails too: every comparison with NaN is false.
    if not 0 <= temperature < math.inf:
        raise Lfm2VlError(
            f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}"
        )
    if not 0 < top_p <= 1:
        raise Lfm2VlError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if not top_k >= 0:
        raise Lfm2VlError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 <= min_p <= 1:
        raise Lfm2VlError(f"min_p must be in [0, 1] (0 disables it), got {min_p}")


def make_warper(
    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Callable[[mx.array], mx.array]:
    """logits -> the logits sampling draws from: temperature, top-k, top-p, min-p, in the
    reference's order; filtered tokens get -inf."""
    _check(temperature, top_p, top_k, min_p)
    if temperature == 0:
        raise Lfm2VlError("temperature 0 is greedy decoding: there is no distribution to warp")

    def warp(logits: mx.array) -> mx.array:
        if temperature != 1:
            logits = apply_temperature(logits, temperature)
        if top_k > 0:
            logits = apply_top_k(logits, top_k)
        if top_p < 1:
            logits = apply_top_p(logits, top_p)
        if min_p > 0:
            logits = apply_min_p(logits, min_p)
        return logits

    return warp


def make_sampler(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Sampler:
    """A function (logits, key) -> token ids; greedy (argmax) when `temperature` is 0, where,
    as in the reference, top-p, top-k and min-p play no part."""
    _check(temperature, top_p, top_k, min_p)
    if temperature == 0:
        return lambda logits, key: mx.argmax(logits, axis=-1)
    warp = make_warper(temperature, top_p, top_k, min_p)
    return lambda logits, key: mx.random.categorical(warp(logits), axis=-1, key=key)


def make_logits_processors(
    repetition_penalty: float = 1.0, repetition_context_size: int | None = None
) -> list[LogitsProcessor]:
    """Processors (tokens, logits) -> logits, applied before the sampler (also when greedy).

    `repetition_context_size` limits the penalty to the last N tokens of prompt + output; None
    penalizes every token seen, as the reference does.
    """
    if not 0 < repetition_penalty < math.inf:
        raise Lfm2VlError(
            f"repetition_penalty must be a finite number > 0 (1 disables it), "
            f"got {repetition_penalty}"
        )
    if repetition_context_size is not None and repetition_context_size < 1:
        raise Lfm2VlError(
            f"repetition_context_size must be >= 1 or None, got {repetition_context_size}"
        )
    if repetition_penalty == 1:
        return []

    def penalize(tokens: mx.array, logits: mx.array) -> mx.array:
        if repetition_context_size is not None:
            tokens = tokens[-repetition_context_size:]
        return apply_repetition_penalty(logits, tokens, repetition_penalty)

    return [penalize]


# The model cards' repetition penalty, recommended with their sampling settings.
_CARD_REPETITION_PENALTY = 1.05


@dataclass(frozen=True)
class SamplingSettings:
    """One place for the sampling defaults.

    The LFM2-VL model cards recommend temperature 0.1, min_p 0.15 and repetition_penalty 1.05;
    a checkpoint's generation_config.json overrides any of them it sets (`from_folder`).

    Temperature 0 is greedy decoding as the reference's `do_sample=False`: the argmax, with a
    repetition penalty only when one is set (by the caller or the checkpoint's
    generation_config.json). The model cards' 1.05 goes with their sampling settings, so
    `repetition_penalty=None` means 1.05 when sampling and no penalty when greedy.
    """

    temperature: float = 0.1
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.15
    repetition_penalty: float | None = None
    repetition_context_size: int | None = None

    @classmethod
    def from_generation_config(cls, config: dict) -> SamplingSettings:
        """The defaults, overridden by the fields a generation_config.json sets.

        A config that says `do_sample: false` means greedy, as in the reference.
        """
        values = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        if config.get("do_sample") is False:
            values["temperature"] = 0.0
        return cls(**values)

    @classmethod
    def from_folder(cls, folder: str | Path | None) -> SamplingSettings:
        path = Path(folder) / "generation_config.json" if folder is not None else None
        if path is None or not path.is_file():
            return cls()
        try:
            return cls.from_generation_config(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise Lfm2VlError(f"cannot read {path} ({e}): fix or delete the file") from None

    def override(self, **values: float | int | None) -> SamplingSettings:
        """These settings with every non-None value in `values` replacing its field."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def sampler(self) -> Sampler:
        return make_sampler(self.temperature, self.top_p, self.top_k, self.min_p)

    def logits_processors(self) -> list[LogitsProcessor]:
        penalty = self.repetition_penalty
        if penalty is None:  # the model cards' value goes with sampling, not with greedy
            penalty = _CARD_REPETITION_PENALTY if self.temperature != 0 else 1.0
        return make_logits_processors(penalty, self.repetition_context_size)


def suppress_tokens(token_ids: Sequence[int]) -> LogitsProcessor:
    """A processor that makes `token_ids` impossible (as the reference's `suppress_tokens`)."""
    ids = mx.array(list(token_ids), mx.int32).reshape(1, -1)

    def suppress(tokens: mx.array, logits: mx.array) -> mx.array:
        index = mx.broadcast_to(ids, (logits.shape[0], ids.shape[1]))
        return mx.put_along_axis(logits, index, mx.array(_NEG_INF, logits.dtype), axis=-1)

    return suppress
