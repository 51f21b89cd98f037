"""The generation loop, streaming text and the chat helper, on the tiny fixture checkpoints.

Greedy runs are compared token for token with the reference `generate`. Random weights would
mostly end at once (EOS) or repeat one token forever, so both sides suppress the EOS ids the
same way and most cases also use the same repetition penalty, still under greedy decoding.
Text-level behaviour (streaming, UTF-8, stop strings, EOS, max_tokens, cancellation) runs
through the real loop with a logits processor that forces a scripted answer.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from reference import reference_model, reference_processor

from mlx_lfm2vl import Chat, Lfm2VlError, generate, load, stream_generate
from mlx_lfm2vl.generate import StopStrings, StreamingDetokenizer, prefill
from mlx_lfm2vl.sampling import suppress_tokens

GREEDY_TOKENS = 48


@lru_cache(maxsize=4)
def loaded(folder: Path):
    return load(folder)


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.BILINEAR)


def user(text: str, n_images: int = 0) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}],
    }


CASES = {
    "image": ([user("Describe this image.", 1)], [(64, 64)], 1.3),
    "two-images": ([user("Compare the two pictures.", 2)], [(64, 64), (96, 64)], 1.3),
    "text-only": ([user("How many apples are on the table?")], [], 1.3),
    "two-turns": (
        [
            user("What is in the picture?", 1),
            {"role": "assistant", "content": "The cat sits on a mat."},
            user("Thank you! Answer briefly: how many?"),
        ],
        [(64, 96)],
        1.3,
    ),
}


@pytest.fixture(scope="module")
def one_torch_thread():
    # Two threads on the shared 2-core machines make the reference ~5x slower, not faster.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_greedy_tokens_equal_reference(
    folder: Path, messages, sizes, penalty: float | None
) -> None:
    """`penalty=None`: neither side is given one (the reference's plain `do_sample=False`)."""
    import torch

    images = [image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    model, processor = loaded(folder)
    ref_processor = reference_processor(folder)
    text = ref_processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = ref_processor(text=text, images=images or None, return_tensors="pt")
    eos = processor.eos_token_ids
    with torch.no_grad():
        output = reference_model(folder).generate(
            **inputs,
            do_sample=False,
            max_new_tokens=GREEDY_TOKENS,
            suppress_tokens=eos,
            **({} if penalty is None else {"repetition_penalty": penalty}),
        )
    expected = output[0, inputs["input_ids"].shape[1] :].tolist()

    assert processor.process(messages, images).input_ids.tolist() == inputs["input_ids"][0].tolist()
    result = generate(
        model,
        processor,
        messages,
        images,
        max_tokens=GREEDY_TOKENS,
        temperature=0,
        repetition_penalty=penalty,
        logits_processors=[suppress_tokens(eos)],
    )
    assert result.tokens == expected
    assert len(set(expected)) > (5 if penalty else 1)  # a sequence that pins something


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_equal_reference_generate(checkpoint, case, one_torch_thread):
    assert_greedy_tokens_equal_reference(checkpoint, *CASES[case])


def test_plain_greedy_tokens_equal_reference_generate(checkpoint_450m, one_torch_thread):
    # temperature=0 alone is the reference's do_sample=False: the model cards' repetition
    # penalty (1.05), a sampling recommendation, does not apply.
    assert_greedy_tokens_equal_reference(
        checkpoint_450m, [user("Describe this image.", 1)], [(64, 64)], penalty=None
    )


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def test_chunked_prefill_equals_one_pass_and_the_full_forward(checkpoint_450m):
    # Chunks of 5 cut through the image tokens; each chunk is appended to the cache, which is
    # only right if the causal mask aligns the chunk's queries with the end of the keys.
    model, processor = loaded(checkpoint_450m)
    inputs = processor([user("Describe this image.", 1)], [image(64, 64)])
    full = model(**inputs)[:, -1, :]
    caches, logits = [], []
    for step in (5, 10_000):
        cache = model.make_cache()
        logits.append(prefill(model, **inputs, cache=cache, step_size=step))
        caches.append(cache)
    scale = float(mx.abs(full).max())
    for out in logits:
        assert float(mx.abs(out - full).max()) <= 1e-5 * max(1.0, scale)
    token = mx.array([[500]])
    after = [model(token, cache=cache)[:, -1, :] for cache in caches]
    assert float(mx.abs(after[0] - after[1]).max()) <= 1e-5 * max(1.0, scale)


def test_seeded_sampling_is_reproducible_through_the_model(checkpoint_450m):
    model, processor = loaded(checkpoint_450m)

    def run(seed: int) -> list[int]:
        options = dict(max_tokens=8, temperature=1.0, min_p=0, seed=seed)
        return generate(model, processor, "Hello", **options).tokens

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_two_models_side_by_side_do_not_disturb_each_other(checkpoint_450m, checkpoint_16b):
    pairs = [loaded(checkpoint_450m), loaded(checkpoint_16b)]
    options = dict(max_tokens=6, temperature=1.0, min_p=0, seed=11)
    alone = [generate(m, p, "Hello there", **options).tokens for m, p in pairs]
    streams = [stream_generate(m, p, "Hello there", **options) for m, p in pairs]
    interleaved: list[list[int]] = [[], []]
    for a, b in zip(*streams, strict=True):
        interleaved[0].append(a.token)
        interleaved[1].append(b.token)
    assert interleaved == alone


def test_stats_count_prompt_and_image_tokens_and_time(checkpoint_450m, capsys):
    model, processor = loaded(checkpoint_450m)
    messages, images = [user("Describe this image.", 1)], [image(64, 64)]
    ids = processor.process(messages, images).input_ids
    result = generate(model, processor, messages, images, max_tokens=4, temperature=0)
    stats = result.stats
    assert stats.prompt_tokens == len(ids)
    assert stats.image_tokens == int((ids == processor.image_token_id).sum()) > 0
    assert stats.generation_tokens == len(result.tokens)
    assert stats.time_to_first_token >= stats.prompt_time > 0
    assert stats.prompt_tps > 0 and stats.generation_tps > 0 and stats.peak_memory > 0
    assert capsys.readouterr() == ("", "")  # the library never prints


def test_user_errors_raise_the_one_exception_type(checkpoint_450m):
    model, processor = loaded(checkpoint_450m)
    with pytest.raises(Lfm2VlError):
        generate(model, processor, "Hi", max_tokens=2, top_p=2.0)
    with pytest.raises(Lfm2VlError):
        generate(model, processor, "Hi", ["/no/such/image.png"], max_tokens=2)
    with pytest.raises(Lfm2VlError):
        generate(model, processor, "Hi", max_tokens=0)


@pytest.mark.parametrize("seed", [-5, 2**64, 1.5, "7"])
def test_seed_outside_the_unsigned_64_bit_range_is_a_user_error(checkpoint_450m, seed):
    # mx.random.key raised a bare TypeError for these.
    model, processor = loaded(checkpoint_450m)
    with pytest.raises(Lfm2VlError, match="seed"):
        generate(model, processor, "Hi", max_tokens=2, seed=seed)
    with pytest.raises(Lfm2VlError, match="seed"):
        Chat(model, processor, max_tokens=2).ask("Hi", seed=seed)
    assert generate(model, processor, "Hi", max_tokens=2, seed=2**64 - 1).tokens


# --------------------------------------------------------------------------------------------
# Text out, through the real loop with a scripted answer
# --------------------------------------------------------------------------------------------

PROMPT = "Hi"
# Words outside the fixture tokenizer's training corpus: their characters split into bytes.
SCRIPT_TEXT = "The cat sits on a mat. Grüße aus Köln, 東京 🚀 und café!"


def scripted(processor, text: str, eos: bool = True):
    """A logits processor that makes the model answer `text` (then EOS), and the answer's ids."""
    prompt_length = len(processor.process(PROMPT).input_ids)
    ids = processor.tokenizer.encode(text, add_special_tokens=False).ids
    script = ids + ([processor.eos_token_ids[0]] if eos else ids * 50)

    def force(history: mx.array, logits: mx.array) -> mx.array:
        target = script[min(history.shape[0] - prompt_length, len(script) - 1)]
        return mx.where(mx.arange(logits.shape[-1]) == target, 0.0, float("-inf"))[None]

    return force, ids


def test_streamed_chunks_join_to_the_one_shot_decode_without_broken_characters(checkpoint_450m):
    model, processor = loaded(checkpoint_450m)
    force, ids = scripted(processor, SCRIPT_TEXT)
    # The tokenizer splits these multi-byte characters across tokens.
    assert any("\ufffd" in processor.decode([i]) for i in ids)
    chunks = list(stream_generate(model, processor, PROMPT, logits_processors=[force]))
    assert [c.token for c in chunks] == ids + [processor.eos_token_ids[0]]
    assert all("\ufffd" not in c.text for c in chunks)
    assert "".join(c.text for c in chunks) == SCRIPT_TEXT == processor.decode(ids)
    assert [c.finish_reason for c in chunks] == [None] * len(ids) + ["stop"]
    result = generate(model, processor, PROMPT, logits_processors=[force])
    assert result.text == SCRIPT_TEXT and result.finish_reason == "stop"


def test_stop_string_ends_the_answer_and_is_never_emitted_even_in_part(checkpoint_450m):
    model, processor = loaded(checkpoint_450m)
    force, ids = scripted(processor, SCRIPT_TEXT)
    chunks = list(
        stream_generate(model, processor, PROMPT, logits_processors=[force], stop=["on a mat"])
    )
    texts = [c.text for c in chunks]
    assert "".join(texts) == "The cat sits "
    assert chunks[-1].finish_reason == "stop" and len(chunks) < len(ids)
    # "on a hat" never completes: its held-back prefix comes out once it cannot be a match.
    result = generate(
        model, processor, PROMPT, logits_processors=[force], stop=["on a hat", "🚀🐱"]
    )
    assert result.text == SCRIPT_TEXT and result.finish_reason == "stop"


def test_max_tokens_ends_with_length_and_flushes_the_text(checkpoint_450m):
    model, processor = loaded(checkpoint_450m)
    force, ids = scripted(processor, SCRIPT_TEXT, eos=False)
    result = generate(model, processor, PROMPT, logits_processors=[force], max_tokens=5)
    assert result.tokens == ids[:5] and result.finish_reason == "length"
    assert result.text == processor.decode(ids[:5])


def test_should_stop_event_and_callback_cancel_the_generation(checkpoint_450m):
    model, processor = loaded(checkpoint_450m)
    force, ids = scripted(processor, SCRIPT_TEXT, eos=False)
    event = threading.Event()
    chunks = []
    for chunk in stream_generate(
        model, processor, PROMPT, logits_processors=[force], should_stop=event
    ):
        chunks.append(chunk)
        if len(chunks) == 3:
            event.set()
    assert len(chunks) == 4 and chunks[-1].finish_reason == "cancelled"
    assert "".join(c.text for c in chunks) == processor.decode(ids[:4])
    calls = iter(range(100))
    result = generate(
        model, processor, PROMPT, logits_processors=[force], should_stop=lambda: next(calls) >= 1
    )
    assert result.finish_reason == "cancelled" and len(result.tokens) == 2


def test_leaving_the_loop_early_leaves_the_model_ready_for_the_next_request(checkpoint_450m):
    model, processor = loaded(checkpoint_450m)
    force, ids = scripted(processor, SCRIPT_TEXT)
    for n, _ in enumerate(stream_generate(model, processor, PROMPT, logits_processors=[force])):
        if n == 2:
            break
    assert generate(model, processor, PROMPT, logits_processors=[force]).text == SCRIPT_TEXT


@pytest.fixture(scope="module")
def tokenizer(checkpoint_450m):
    return loaded(checkpoint_450m)[1].tokenizer


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\ufffd"), max_size=40))
def test_detokenizer_emits_whole_characters_and_joins_to_the_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    detokenizer = StreamingDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)
    # Special tokens typed as text (e.g. "<image>") are skipped by both decodes alike.
    special = {
        token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special
    }
    if not any(token in text for token in special):
        assert "".join(pieces) == text


def test_detokenizer_holds_each_byte_of_a_character_until_it_is_complete(tokenizer):
    # One token per byte (the byte-level alphabet): 🙂 is 4 tokens, é 2.
    byte_chars = {
        b: c
        for b, c in zip(
            list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256)),
            [chr(b) for b in list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))],
            strict=True,
        )
    }
    extra = [b for b in range(256) if b not in byte_chars]
    byte_chars.update({b: chr(256 + i) for i, b in enumerate(extra)})
    text = "é🙂x"
    ids = [tokenizer.token_to_id(byte_chars[b]) for b in text.encode("utf-8")]
    assert None not in ids and len(ids) == 7
    detokenizer = StreamingDetokenizer(tokenizer)
    assert [detokenizer.add(i) for i in ids] == ["", "é", "", "", "", "🙂", "x"]
    # Cut short inside a character: the flush gives what a one-shot decode gives.
    detokenizer = StreamingDetokenizer(tokenizer)
    assert detokenizer.add(ids[2]) + detokenizer.flush() == tokenizer.decode(ids[2:3])


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc ", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_strings_cut_at_the_first_match_for_any_split_of_the_text(text, stops, cuts):
    """Generation stops after the first piece (token) that completes a stop string, and the
    text is cut where the earliest stop string in the text so far begins."""
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    matcher = StopStrings(stops)
    out, hit = "", False
    for piece in pieces:
        emitted, hit = matcher.feed(piece)
        out += emitted
        if hit:
            break
    if not hit:
        out += matcher.flush()
    expected, expected_hit = text, False
    for end in bounds[1:]:
        matches = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if matches:
            expected, expected_hit = text[: min(matches)], True
            break
    assert out == expected
    assert hit == expected_hit


# --------------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------------


def test_continued_chat_gives_the_logits_of_a_cold_prefill_of_the_whole_history(checkpoint_16b):
    model, processor = loaded(checkpoint_16b)
    options = dict(temperature=0, repetition_penalty=1.3, max_tokens=4)
    first, second = image(64, 64, seed=1), image(48, 80, seed=2)
    chat = Chat(model, processor, system="Answer briefly.", **options)
    turns = [("What is this?", [first]), ("And this one?", [second]), ("Which is larger?", [])]
    for i, (text, images) in enumerate(turns):
        history = [*chat.messages, user(text, len(images))]
        warm = list(chat.send(text, images))
        cold = list(stream_generate(model, processor, history, chat.images, **options))
        assert [c.token for c in warm] == [c.token for c in cold]
        for w, c in zip(warm, cold, strict=True):
            error = float(mx.abs(w.logprobs - c.logprobs).max())
            assert error <= 1e-4, f"turn {i}: max logprob difference {error}"
        new_image_tokens = sum(
            int((processor.process("x", [im]).input_ids == processor.image_token_id).sum())
            for im in images
        )
        # Only the new turn is prefilled; earlier images are not encoded again.
        assert warm[-1].stats.image_tokens == new_image_tokens
        if i > 0:
            assert warm[-1].stats.prompt_tokens < cold[-1].stats.prompt_tokens
        assert chat.messages[-1] == {"role": "assistant", "content": "".join(c.text for c in warm)}
    assert len(chat.images) == 2 and len(chat.messages) == 7


def test_chat_reset_forgets_the_conversation_but_keeps_the_system_message(checkpoint_450m):
    model, processor = loaded(checkpoint_450m)
    chat = Chat(model, processor, system="Be brief.", temperature=0, max_tokens=2)
    first = chat.ask("Hello", image(64, 64))
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}] and chat.images == []
    assert chat.ask("Hello", image(64, 64)).tokens == first.tokens


def test_chat_rejects_unknown_options(checkpoint_450m):
    model, processor = loaded(checkpoint_450m)
    with pytest.raises(Lfm2VlError, match="max_token"):
        Chat(model, processor, max_token=3)
    with pytest.raises(Lfm2VlError, match="image_options"):
        next(Chat(model, processor).send("Hi", max_image_tokens=64))
