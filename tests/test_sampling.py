"""Samplers and logits processors: each rule on crafted logits, and the chain against the reference
warpers of `transformers` (same order, same ties, same "keep one token" rule)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mlx_lfm2vl.errors import Lfm2VlError
from mlx_lfm2vl.sampling import (
    SamplingSettings,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
    make_warper,
    suppress_tokens,
)


def logits_of(probs) -> mx.array:
    return mx.log(mx.array(np.asarray([probs], np.float32)))


def kept(logits: mx.array) -> list[int]:
    return np.flatnonzero(np.isfinite(np.asarray(logits[0]))).tolist()


def test_greedy_sampler_takes_the_argmax_whatever_the_key():
    logits = mx.array([[0.1, 2.0, -1.0, 1.9]])
    sampler = make_sampler(temperature=0)
    assert [sampler(logits, mx.random.key(s)).item() for s in range(5)] == [1] * 5


def test_top_k_keeps_the_k_largest_and_ties_at_the_threshold():
    logits = mx.array([[1.0, 5.0, 3.0, 3.0, 0.0, 4.0]])
    assert kept(apply_top_k(logits, 2)) == [1, 5]
    assert kept(apply_top_k(logits, 3)) == [1, 2, 3, 5]  # the tie at the 3rd value stays
    assert kept(apply_top_k(logits, 100)) == list(range(6))


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = logits_of([0.05, 0.5, 0.15, 0.3])
    assert kept(apply_top_p(logits, 0.5)) == [1]
    assert kept(apply_top_p(logits, 0.79)) == [1, 3]
    assert kept(apply_top_p(logits, 0.81)) == [1, 2, 3]
    assert kept(apply_top_p(logits, 1e-6)) == [1]  # never empty: the top token stays


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    logits = logits_of([0.6, 0.25, 0.1, 0.05])
    assert kept(apply_min_p(logits, 0.2)) == [0, 1]  # threshold 0.12
    assert kept(apply_min_p(logits, 0.1)) == [0, 1, 2]  # threshold 0.06
    assert kept(apply_min_p(logits, 1.0)) == [0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = mx.array([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, mx.array([0, 1, 1]), 2.0)
    np.testing.assert_allclose(np.asarray(out), [[1.0, -2.0, 0.5, 3.0]])
    np.testing.assert_allclose(np.asarray(logits), [[2.0, -1.0, 0.5, 3.0]])  # input untouched


def test_repetition_context_size_penalizes_only_the_last_tokens():
    (penalize,) = make_logits_processors(repetition_penalty=2.0, repetition_context_size=2)
    out = penalize(mx.array([0, 1, 3]), mx.array([[2.0, 2.0, 2.0, 2.0]]))
    np.testing.assert_allclose(np.asarray(out), [[2.0, 1.0, 2.0, 1.0]])
    assert make_logits_processors(repetition_penalty=1.0) == []


def test_suppress_tokens_makes_them_impossible():
    out = suppress_tokens([1, 3])(mx.zeros((0,), mx.int32), mx.array([[1.0, 9.0, 0.0, 9.0]]))
    assert kept(out) == [0, 2]


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.7, top_k=40),
        dict(temperature=0.1, min_p=0.15),
        dict(temperature=1.3, top_p=0.9),
        dict(temperature=0.5, top_k=50, top_p=0.8, min_p=0.05),
    ],
)
def test_warper_chain_matches_the_reference_warpers(settings):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 1000)).astype(np.float32) * 3
    reference = LogitsProcessorList([TemperatureLogitsWarper(settings["temperature"])])
    if settings.get("top_k"):
        reference.append(TopKLogitsWarper(settings["top_k"]))
    if settings.get("top_p"):
        reference.append(TopPLogitsWarper(settings["top_p"]))
    if settings.get("min_p"):
        reference.append(MinPLogitsWarper(settings["min_p"]))
    expected = reference(torch.zeros((3, 1), dtype=torch.long), torch.from_numpy(scores)).numpy()
    actual = np.asarray(make_warper(**settings)(mx.array(scores)))
    np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-5)
    assert 0 < finite.sum() < finite.size  # the case filters something and keeps something


def test_repetition_penalty_matches_the_reference_processor():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(1, 500)).astype(np.float32)
    history = rng.integers(0, 500, 60)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(
        torch.from_numpy(history)[None], torch.from_numpy(scores.copy())
    ).numpy()
    (penalize,) = make_logits_processors(repetition_penalty=1.3)
    actual = np.asarray(penalize(mx.array(history, mx.int32), mx.array(scores)))
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_seeded_sampling_is_reproducible_and_the_seed_matters():
    logits = mx.broadcast_to(mx.zeros((1, 50)), (64, 50))
    sampler = make_sampler(temperature=1.0)
    first = np.asarray(sampler(logits, mx.random.key(7)))
    assert np.array_equal(first, np.asarray(sampler(logits, mx.random.key(7))))
    assert not np.array_equal(first, np.asarray(sampler(logits, mx.random.key(8))))


def test_sampling_frequencies_follow_the_warped_distribution():
    # 20000 draws at temperature 2 from p = [.5, .3, .15, .05] with min_p 0.2: the warped
    # distribution is softmax(log p / 2) over the tokens min-p keeps, zero elsewhere.
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    warped = np.sqrt(probs)
    warped = warped / warped.sum()
    expected = np.where(warped >= 0.2 * warped.max(), warped, 0)
    expected = expected / expected.sum()
    logits = mx.broadcast_to(logits_of(probs), (20000, 4))
    draws = np.asarray(make_sampler(temperature=2.0, min_p=0.2)(logits, mx.random.key(0)))
    frequencies = np.bincount(draws, minlength=4) / draws.size
    assert frequencies[expected == 0].sum() == 0
    np.testing.assert_allclose(frequencies, expected, atol=0.015)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(temperature=1, top_p=0),
        dict(temperature=1, top_p=1.5),
        dict(temperature=1, top_k=-2),
        dict(temperature=1, min_p=2),
        # Not a number, or infinite: every range check must reject these too.
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(temperature=1, top_p=float("nan")),
        dict(temperature=1, top_p=float("inf")),
        dict(temperature=1, min_p=float("nan")),
        dict(temperature=1, min_p=float("inf")),
        dict(temperature=1, top_k=float("nan")),
    ],
)
def test_invalid_sampling_values_raise_the_user_error(bad):
    with pytest.raises(Lfm2VlError):
        make_sampler(**bad)


@pytest.mark.parametrize("penalty", [0, -1, float("nan"), float("inf"), float("-inf")])
def test_invalid_repetition_penalty_raises_the_user_error(penalty):
    with pytest.raises(Lfm2VlError, match="repetition_penalty"):
        make_logits_processors(penalty)


def penalty_applied(settings: SamplingSettings) -> float:
    """The repetition penalty `settings` apply (1 when none), measured on a seen token."""
    processors = settings.logits_processors()
    if not processors:
        return 1.0
    [penalize] = processors
    return 2.0 / penalize(mx.array([0]), mx.array([[2.0, 1.0]]))[0, 0].item()


def test_defaults_are_the_model_card_values_unless_generation_config_sets_them(tmp_path):
    defaults = SamplingSettings.from_folder(tmp_path)
    assert defaults == SamplingSettings(temperature=0.1, min_p=0.15)
    assert penalty_applied(defaults) == pytest.approx(1.05)
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 7, "temperature": 0.7, "top_k": 20})
    )
    settings = SamplingSettings.from_folder(tmp_path)
    assert (settings.temperature, settings.top_k, settings.min_p) == (0.7, 20, 0.15)
    greedy = SamplingSettings.from_generation_config({"do_sample": False, "temperature": 0.7})
    assert greedy.temperature == 0
    assert settings.override(temperature=None, top_p=0.5).top_p == 0.5
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(Lfm2VlError, match="generation_config.json"):
        SamplingSettings.from_folder(tmp_path)


def test_greedy_applies_a_repetition_penalty_only_when_one_is_set():
    # The reference's do_sample=False: the model cards' 1.05 is a sampling recommendation.
    assert penalty_applied(SamplingSettings().override(temperature=0)) == 1.0
    explicit = SamplingSettings().override(temperature=0, repetition_penalty=1.3)
    assert penalty_applied(explicit) == pytest.approx(1.3)
    assert penalty_applied(SamplingSettings.from_generation_config({"do_sample": False})) == 1.0
    config = {"do_sample": False, "repetition_penalty": 1.2}  # as transformers: it applies
    assert penalty_applied(SamplingSettings.from_generation_config(config)) == pytest.approx(1.2)
    assert penalty_applied(SamplingSettings().override(temperature=0.7)) == pytest.approx(1.05)


def test_checkpoint_generation_config_sets_the_api_sampling_defaults(checkpoint_450m, tmp_path):
    import shutil

    from mlx_lfm2vl.generate import checkpoint_sampling
    from mlx_lfm2vl.processor import Processor

    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint_450m, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    published = checkpoint_sampling(Processor.from_pretrained(folder))
    assert published == SamplingSettings()  # the published file sets no sampling fields

    config = {"eos_token_id": 7, "temperature": 0.7, "top_k": 5}
    (folder / "generation_config.json").write_text(json.dumps(config))
    settings = checkpoint_sampling(Processor.from_pretrained(folder))
    assert (settings.temperature, settings.top_k, settings.min_p) == (0.7, 5, 0.15)

    config["do_sample"] = False
    (folder / "generation_config.json").write_text(json.dumps(config))
    assert checkpoint_sampling(Processor.from_pretrained(folder)).temperature == 0.0
