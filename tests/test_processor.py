"""The processor (tokenizer, chat template, `<image>` expansion) against the reference
`Lfm2VlProcessor`, on the fixture checkpoints.

Token ids must be identical and pixel values bit-equal to the reference's after dropping its
padding: any difference at all is a bug.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mlx_lfm2vl.errors import Lfm2VlError
from mlx_lfm2vl.image_processor import ImageProcessorSettings
from mlx_lfm2vl.processor import Processor

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@lru_cache(maxsize=4)
def reference_processor(folder: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image: noise alone would make every resize look alike."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), int)
    noise = rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


SMALL = (200, 300)  # one view
TILED = (700, 1000)  # a 2x3 grid (+ thumbnail where the checkpoint uses one)


def user(*content: str | None) -> dict:
    """A user turn; None stands for an image, strings for text items."""
    items = [{"type": "image"} if c is None else {"type": "text", "text": c} for c in content]
    return {"role": "user", "content": items}


CONVERSATIONS = {
    "system_prompt_and_image": (
        [{"role": "system", "content": "You are a helpful assistant."}, user(None, "Describe.")],
        [SMALL],
    ),
    "several_turns_images_in_different_turns": (
        [
            user(None, "What is in the picture?"),
            {"role": "assistant", "content": "A cat sits on a mat."},
            user("And here?", None),
        ],
        [SMALL, TILED],
    ),
    "several_images_in_one_turn": (
        [user(None, None, "Compare them.", None)],
        [SMALL, TILED, SMALL],
    ),
    "text_only": (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "How many apples? café, 日本語 🙂"},
            {"role": "assistant", "content": [{"type": "text", "text": "Three."}]},
            {"role": "user", "content": "Thank you!"},
        ],
        [],
    ),
    "image_only": ([user(None)], [TILED]),
}


@pytest.fixture(scope="module")
def processors(checkpoint):
    return Processor.from_pretrained(checkpoint), reference_processor(checkpoint)


def images_of(sizes: list[tuple[int, int]]) -> list:
    return [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]


def reference_encode(reference, messages, images, **options) -> dict:
    text = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return reference(images=images or None, text=text, return_tensors="np", **options)


def assert_same_as_reference(inputs: dict, ref: dict) -> None:
    """Identical ids, identical spatial shapes, bit-equal unpadded pixel values."""
    expected_keys = (
        {"input_ids", "pixel_values", "spatial_shapes"} if "pixel_values" in ref else {"input_ids"}
    )
    assert set(inputs) == expected_keys
    assert inputs["input_ids"].dtype == mx.int32
    np.testing.assert_array_equal(np.asarray(inputs["input_ids"]), ref["input_ids"])
    if "pixel_values" in ref:
        assert inputs["pixel_values"].dtype == mx.float32
        assert inputs["spatial_shapes"].dtype == mx.int32
        np.testing.assert_array_equal(np.asarray(inputs["spatial_shapes"]), ref["spatial_shapes"])
        real = ref["pixel_values"][ref["pixel_attention_mask"].astype(bool)]
        pixels = np.asarray(inputs["pixel_values"])
        assert pixels.shape == real.shape
        assert np.abs(pixels - real).max() == 0.0


# ------------------------------------------------------------------------------------------------
# Parity with the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_conversation_gives_reference_prompt_ids_and_pixels(processors, case):
    processor, reference = processors
    messages, sizes = CONVERSATIONS[case]
    images = images_of(sizes)
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected
    assert_same_as_reference(
        processor(messages, images=images), reference_encode(reference, messages, images)
    )


def test_template_without_generation_prompt_matches_reference(checkpoint_450m):
    processor, reference = (
        Processor.from_pretrained(checkpoint_450m),
        reference_processor(checkpoint_450m),
    )
    messages = CONVERSATIONS["several_turns_images_in_different_turns"][0]
    expected = reference.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert processor.apply_chat_template(messages, add_generation_prompt=False) == expected


def test_plain_string_prompt_is_one_user_turn_with_images_first(processors):
    processor, reference = processors
    images = images_of([SMALL, SMALL])
    messages = [user(None, None, "What is different?")]
    assert processor.process("What is different?", images).text == (
        reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )
    assert_same_as_reference(
        processor("What is different?", images=images),
        reference_encode(reference, messages, images),
    )


def test_plain_string_without_images_matches_reference_text_turn(processors):
    processor, reference = processors
    assert_same_as_reference(
        processor("Hello there."), reference_encode(reference, [user("Hello there.")], [])
    )


def test_image_markers_in_a_string_prompt_place_the_images(checkpoint_16b):
    processor, reference = (
        Processor.from_pretrained(checkpoint_16b),
        reference_processor(checkpoint_16b),
    )
    images = images_of([SMALL, TILED])
    prompt = "First <image> then <image> - same?"
    assert_same_as_reference(
        processor(prompt, images=images), reference_encode(reference, [user(prompt)], images)
    )


def test_encode_of_a_rendered_prompt_equals_reference_processor_call(checkpoint_16b):
    processor, reference = (
        Processor.from_pretrained(checkpoint_16b),
        reference_processor(checkpoint_16b),
    )
    text = "<|startoftext|><|im_start|>user\n<image>Hi<|im_end|>\n<|im_start|>assistant\n"
    image = images_of([TILED])
    ours = processor.encode(text, image)
    ref = reference(images=image, text=text, return_tensors="np")
    assert_same_as_reference(ours.model_inputs, ref)
    assert ours.images.image_rows == [2] and ours.images.image_cols == [3]
    assert ours.image_token_counts == [int((ref["input_ids"] == processor.image_token_id).sum())]


@pytest.mark.parametrize(
    "options",
    [
        {"max_image_tokens": 64},
        {"do_image_splitting": False},
        {"use_thumbnail": False},
        {"use_thumbnail": True},
        {"min_image_tokens": 32, "max_image_tokens": 128, "max_tiles": 4},
        {"tile_size": 256, "max_pixels_tolerance": 1.0},
        {"use_image_special_tokens": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_per_call_options_give_reference_ids_with_the_same_kwargs(checkpoint_16b, options):
    processor, reference = (
        Processor.from_pretrained(checkpoint_16b),
        reference_processor(checkpoint_16b),
    )
    messages, sizes = CONVERSATIONS["several_images_in_one_turn"]
    images = images_of(sizes)
    assert_same_as_reference(
        processor(messages, images=images, **options),
        reference_encode(reference, messages, images, **options),
    )


def test_lower_max_image_tokens_tiles_a_640x480_image_into_6_tiles_and_thumbnail(checkpoint_16b):
    processor = Processor.from_pretrained(checkpoint_16b)
    result = processor.process("Hi", [random_image(480, 640)], max_image_tokens=64)
    assert result.images.views_per_image == [7]
    text = processor.decode(result.input_ids)
    assert "<|img_row_2_col_3|>" in text and "<|img_thumbnail|>" in text


def test_options_set_for_one_call_do_not_stick(checkpoint_16b):
    processor = Processor.from_pretrained(checkpoint_16b)
    image = [random_image(*TILED)]
    before = processor("Hi", image)["input_ids"]
    processor("Hi", image, do_image_splitting=False)
    assert mx.array_equal(processor("Hi", image)["input_ids"], before)


def test_use_image_special_tokens_is_read_from_processor_config(checkpoint_16b, tmp_path):
    # The reference (transformers 5.23) ignores this file setting and only honours the call kwarg;
    # the port reads the file as documented, so compare with the reference's call kwarg.
    reference = reference_processor(checkpoint_16b)
    messages, sizes = CONVERSATIONS["several_images_in_one_turn"]
    images = images_of(sizes)
    expected = reference_encode(reference, messages, images, use_image_special_tokens=False)
    for nested in (False, True):
        folder = copy_processor_files(checkpoint_16b, tmp_path / f"nested-{nested}")
        config_file = folder / "processor_config.json"
        config = json.loads(config_file.read_text())
        if nested:
            preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
            config = {"image_processor": {**preprocessor, "use_image_special_tokens": False}}
        else:
            config["use_image_special_tokens"] = False
        config_file.write_text(json.dumps(config))
        processor = Processor.from_pretrained(folder)
        assert processor.use_image_special_tokens is False
        assert_same_as_reference(processor(messages, images=images), expected)


def test_image_token_id_comes_from_the_tokenizer_not_a_constant(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    processor = Processor.from_pretrained(checkpoint)
    assert processor.image_token_id == config["image_token_id"]
    ids = np.asarray(processor("Hi", [random_image(*SMALL)])["input_ids"])
    assert (ids == config["image_token_id"]).sum() == processor.process(
        "Hi", [random_image(*SMALL)]
    ).image_token_counts[0]


def test_special_token_ids_and_decode_match_reference_tokenizer(processors):
    processor, reference = processors
    tokenizer = reference.tokenizer
    assert processor.bos_token_id == tokenizer.bos_token_id
    assert tokenizer.eos_token_id in processor.eos_token_ids
    ids = processor.process("Hi , café ! 日本語", [random_image(*SMALL)]).input_ids
    for skip in (False, True):
        assert processor.decode(ids, skip_special_tokens=skip) == tokenizer.decode(
            ids.tolist(), skip_special_tokens=skip
        )
    assert processor.decode(mx.array(ids)[None]) == processor.decode(ids.tolist())


def test_eos_ids_join_generation_config_list_and_tokenizer_eos(checkpoint_450m, tmp_path):
    folder = copy_processor_files(checkpoint_450m, tmp_path / "eos")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert Processor.from_pretrained(folder).eos_token_ids == [2, 7]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert Processor.from_pretrained(folder).eos_token_ids == [2, 7]
    (folder / "generation_config.json").unlink()
    assert Processor.from_pretrained(folder).eos_token_ids == [7]


# ------------------------------------------------------------------------------------------------
# The chat template
# ------------------------------------------------------------------------------------------------

# Exercises what transformers' template environment provides: trim/lstrip blocks, tojson with its
# options and without HTML escaping, namespace, loop controls, the generation tag, the special
# tokens as variables, None-valued keys dropped, reasoning aliases.
FEATURE_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ message.role }}>{{ message.content | tojson }}
    |{{ message | tojson(indent=1, sort_keys=True) }}
    {% if message.reasoning_content is defined %}[{{ message.reasoning_content }}]{% endif %}
    {% generation %}{{ eos_token }}{% endgeneration %}
{% endfor %}
{{ ns.n }} {{ image_token }} {{ dict(a=1) | tojson }}{% if add_generation_prompt %}GO{% endif %}
"""


def test_template_environment_renders_like_transformers(checkpoint_450m, tmp_path):
    folder = copy_processor_files(checkpoint_450m, tmp_path / "features")
    (folder / "chat_template.jinja").write_text(FEATURE_TEMPLATE)
    processor = Processor.from_pretrained(folder)
    messages = [
        {"role": "system", "content": "<b>&'\"</b> café", "name": None},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "ok", "thinking": "hmm"},
        user(None, "Hi"),
    ]
    expected = reference_processor(checkpoint_450m).apply_chat_template(
        messages, chat_template=FEATURE_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert processor.apply_chat_template(messages) == expected


def test_template_raise_exception_becomes_lfm2vl_error(checkpoint_450m, tmp_path):
    folder = copy_processor_files(checkpoint_450m, tmp_path / "raises")
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('Start with a user turn') }}{% endif %}"
    )
    with pytest.raises(Lfm2VlError, match="Start with a user turn"):
        Processor.from_pretrained(folder).apply_chat_template([{"role": "system", "content": "x"}])


def test_template_cannot_reach_python_internals(checkpoint_450m, tmp_path):
    folder = copy_processor_files(checkpoint_450m, tmp_path / "escape")
    (folder / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Lfm2VlError, match="unsafe"):
        Processor.from_pretrained(folder).apply_chat_template([user("x")])


@pytest.mark.parametrize("source", ["chat_template.json", "tokenizer_config.json"])
def test_chat_template_falls_back_to_json_files(checkpoint_450m, tmp_path, source):
    folder = copy_processor_files(checkpoint_450m, tmp_path / "fallback")
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    path = folder / source
    data = json.loads(path.read_text()) if path.exists() else {}
    data["chat_template"] = template
    path.write_text(json.dumps(data))
    messages = CONVERSATIONS["text_only"][0]
    expected = reference_processor(checkpoint_450m).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert Processor.from_pretrained(folder).apply_chat_template(messages) == expected


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor_450m(checkpoint_450m) -> Processor:
    return Processor.from_pretrained(checkpoint_450m)


@pytest.mark.parametrize(
    ("prompt", "n_images", "message"),
    [
        ([user(None, None, "two markers")], 1, "2 <image> marker.*but 1 image"),
        ([user(None, "one marker")], 2, "1 <image> marker.*but 2 image"),
        ([user("a message list gets no implicit image items")], 1, "0 <image> marker.*but 1"),
        ("a literal <image> and <image>", 1, "2 <image> marker.*but 1 image"),
        ("a literal <image> without images", 0, "1 <image> marker.*but 0 image"),
        ([user("a literal <image> in a text item")], 0, "1 <image> marker.*but 0 image"),
    ],
)
def test_marker_and_image_counts_must_agree(processor_450m, prompt, n_images, message):
    with pytest.raises(Lfm2VlError, match=message):
        processor_450m(prompt, images=[random_image(*SMALL)] * n_images)


def test_encode_counts_markers_in_raw_text(processor_450m):
    with pytest.raises(Lfm2VlError, match="one image per <image> marker"):
        processor_450m.encode("<image><image>", [random_image(*SMALL)])


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": [{"type": "video"}]}], "unknown type 'video'"),
        ([{"role": "user", "content": [{"text": "no type"}]}], "unknown type None"),
        ([{"role": "user", "content": ["bare string"]}], "unknown type None"),
        ([{"role": "user", "content": [{"type": "text"}]}], 'without a "text" string'),
        ([{"role": "user", "content": 42}], "content must be a string or a list"),
        ([{"content": "no role"}], "Message 0 is not a"),
        ([], "non-empty list"),
        ({"role": "user", "content": "a dict, not a list"}, "non-empty list"),
    ],
)
def test_malformed_messages_raise_error_naming_the_fix(processor_450m, messages, message):
    with pytest.raises(Lfm2VlError, match=message):
        processor_450m(messages)


def test_unknown_option_names_the_valid_ones(processor_450m):
    with pytest.raises(Lfm2VlError) as error:
        processor_450m("Hi", [random_image(*SMALL)], max_image_token=64)
    text = str(error.value)
    assert "max_image_token" in text
    for name in ("max_image_tokens", "do_image_splitting", "use_thumbnail", "tile_size"):
        assert name in text
    assert "use_image_special_tokens" in text


def test_text_with_undecodable_bytes_is_a_clear_error(processor_450m):
    # sys.argv or os.fsdecode keep bytes that are not UTF-8 as lone surrogates; the tokenizer
    # raised a bare TypeError on them.
    for prompt in ("caf\udce9", [{"role": "user", "content": "caf\udce9"}]):
        with pytest.raises(Lfm2VlError, match="'\\\\udce9' at character"):
            processor_450m(prompt)
    with pytest.raises(Lfm2VlError, match="not text"):
        processor_450m.encode("<image>\ud800", [random_image(*SMALL)])


def test_bad_options_fail_even_without_images(processor_450m):
    with pytest.raises(Lfm2VlError, match="Unknown option"):
        processor_450m("Hi", do_splitting=False)
    with pytest.raises(Lfm2VlError, match="min_image_tokens"):
        processor_450m("Hi", min_image_tokens=512, max_image_tokens=64)


def test_missing_tokenizer_json_is_a_clear_error(checkpoint_450m, tmp_path):
    folder = copy_processor_files(checkpoint_450m, tmp_path / "no-tokenizer")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(Lfm2VlError, match="tokenizer.json is missing. Download"):
        Processor.from_pretrained(folder)


def test_damaged_tokenizer_json_is_a_clear_error(checkpoint_450m, tmp_path):
    folder = copy_processor_files(checkpoint_450m, tmp_path / "bad-tokenizer")
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(Lfm2VlError, match="Re-download tokenizer.json"):
        Processor.from_pretrained(folder)


def test_missing_chat_template_is_a_clear_error(checkpoint_450m, tmp_path):
    folder = copy_processor_files(checkpoint_450m, tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(Lfm2VlError, match="No chat template.*chat_template.jinja"):
        Processor.from_pretrained(folder)


def test_tokenizer_of_another_model_is_refused(checkpoint_450m, tmp_path):
    folder = copy_processor_files(checkpoint_450m, tmp_path / "wrong-id")
    config = json.loads((folder / "config.json").read_text())
    config["image_token_id"] = 124907
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Lfm2VlError, match="image token id is 124907.*396"):
        Processor.from_pretrained(folder)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(Lfm2VlError, match="not a folder"):
        Processor.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------
# Token counts equal the model's features
# ------------------------------------------------------------------------------------------------


def projected_features(spatial_shapes: np.ndarray, downsample_factor: int = 2) -> int:
    """Rows the projector makes: pixel unshuffle turns each h x w view into (h/f) * (w/f)."""
    return int(sum((h // downsample_factor) * (w // downsample_factor) for h, w in spatial_shapes))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 1600), st.integers(1, 1600)), min_size=1, max_size=2),
    min_tokens=st.sampled_from([16, 32, 64]),
    max_tokens=st.sampled_from([64, 128, 256]),
    splitting=st.booleans(),
    thumbnail=st.booleans(),
    min_tiles=st.integers(1, 4),
    extra_tiles=st.integers(0, 8),
    tile_size=st.sampled_from([256, 384, 512]),
    tolerance=st.sampled_from([1.0, 1.5, 2.0]),
    special=st.booleans(),
)
def test_image_token_count_equals_projected_features(
    processor_450m,
    sizes,
    min_tokens,
    max_tokens,
    splitting,
    thumbnail,
    min_tiles,
    extra_tiles,
    tile_size,
    tolerance,
    special,
):
    images = [np.zeros((h, w, 3), np.uint8) for h, w in sizes]
    result = processor_450m.encode(
        "<image>" * len(images),
        images,
        min_image_tokens=min_tokens,
        max_image_tokens=max_tokens,
        do_image_splitting=splitting,
        use_thumbnail=thumbnail,
        min_tiles=min_tiles,
        max_tiles=min_tiles + extra_tiles,
        tile_size=tile_size,
        max_pixels_tolerance=tolerance,
        use_image_special_tokens=special,
    )
    shapes = result.images.spatial_shapes
    n_tokens = int((result.input_ids == processor_450m.image_token_id).sum())
    assert n_tokens == projected_features(shapes) == sum(result.image_token_counts)
    assert result.images.pixel_values.shape[0] == int((shapes[:, 0] * shapes[:, 1]).sum())
    text = processor_450m.decode(result.input_ids)
    assert text.count("<|image_start|>") == (len(images) if special else 0)
    rows, cols = result.images.image_rows, result.images.image_cols
    tiled = sum(1 for r, c in zip(rows, cols, strict=True) if r * c > 1)
    assert text.count("<|img_thumbnail|>") == (tiled if special and thumbnail else 0)


def test_too_large_image_on_a_1x1_grid_gets_tokens_for_its_tile_unlike_reference(checkpoint_16b):
    # With min_tiles=1 a too-large square image can get a 1x1 grid: one 512x512 view
    # (256 features). The reference writes tokens for the smart_resize size (64), which its own
    # model then rejects; the port writes one token per feature.
    processor = Processor.from_pretrained(checkpoint_16b)
    image = [random_image(600, 600)]
    result = processor.process("Hi", image, min_tiles=1, max_image_tokens=64)
    np.testing.assert_array_equal(result.images.spatial_shapes, [[32, 32]])
    assert result.image_token_counts == [256]
    ref = reference_encode(
        reference_processor(checkpoint_16b),
        [user(None, "Hi")],
        image,
        min_tiles=1,
        max_image_tokens=64,
    )
    assert int((ref["input_ids"] == processor.image_token_id).sum()) == 64


def test_processor_output_runs_the_model_like_the_reference_end_to_end(checkpoint_450m):
    import torch
    from transformers import Lfm2VlForConditionalGeneration

    from mlx_lfm2vl.loading import load_model

    processor, reference = (
        Processor.from_pretrained(checkpoint_450m),
        reference_processor(checkpoint_450m),
    )
    messages, images = [user(None, "Describe.")], [random_image(96, 160)]
    logits = load_model(checkpoint_450m)(**processor(messages, images=images))
    ref_inputs = reference(
        images=images,
        text=reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        return_tensors="pt",
    )
    with torch.no_grad():
        model = Lfm2VlForConditionalGeneration.from_pretrained(checkpoint_450m).eval()
        expected = model(**ref_inputs).logits.float().numpy()
    assert logits.shape == expected.shape
    assert np.abs(np.asarray(logits) - expected).max() < 1e-3


# ------------------------------------------------------------------------------------------------
# Packaging
# ------------------------------------------------------------------------------------------------


def test_importing_the_processor_imports_neither_torch_nor_transformers():
    code = (
        "import mlx_lfm2vl.processor, sys; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_less_common_image_settings_are_accepted_per_call(processor_450m):
    defaults = ImageProcessorSettings()
    for name in ("min_tiles", "max_tiles", "tile_size", "max_pixels_tolerance", "resample"):
        processor_450m("Hi", [random_image(*SMALL)], **{name: getattr(defaults, name)})


def copy_processor_files(checkpoint: Path, folder: Path) -> Path:
    """A copy of a fixture's small files (no weights), for tests that edit them."""
    folder.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    return folder
