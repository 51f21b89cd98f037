"""The NumPy image processor against the reference `Lfm2VlImageProcessor` (transformers).

Pixel values are compared for bit equality: the port reproduces torchvision's antialiased uint8
resize exactly, so any difference at all is a bug.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import REFERENCE_DIR
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms.v2 import functional as tvF
from transformers.image_utils import load_image as reference_load_image
from transformers.models.lfm2_vl.image_processing_lfm2_vl import Lfm2VlImageProcessor
from transformers.models.lfm2_vl.processing_lfm2_vl import Lfm2VlProcessor

from mlx_lfm2vl import image_processor
from mlx_lfm2vl.errors import Lfm2VlError
from mlx_lfm2vl.image_processor import (
    ImageBatch,
    ImageProcessor,
    ImageProcessorSettings,
    image_token_count,
    load_image,
    resize,
    resolve_settings,
    smart_resize,
)

# The reference decodes paths with torchvision's deprecated image IO.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def published_config(model: str) -> dict:
    return json.loads((REFERENCE_DIR / model / "preprocessor_config.json").read_text())


CONFIGS = {"450M": published_config("LFM2-VL-450M"), "1.6B": published_config("LFM2-VL-1.6B")}

# Settings the port and the reference both take as keyword arguments.
SHARED_OPTIONS = {
    "min_image_tokens",
    "max_image_tokens",
    "do_image_splitting",
    "use_thumbnail",
    "min_tiles",
    "max_tiles",
    "tile_size",
    "max_pixels_tolerance",
    "resample",
    "image_mean",
    "image_std",
    "rescale_factor",
    "do_rescale",
    "do_normalize",
    "encoder_patch_size",
    "downsample_factor",
}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def make_image(height: int, width: int, seed: int, kind: str = "mixed") -> np.ndarray:
    """Seeded RGB content: smooth gradients (resampling near-flat areas), noise (every weight
    matters), or both."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 6.28, 3)
    smooth = np.stack(
        [
            127.5 + 127.5 * np.sin(xx / (3 + width / 7) + yy / (5 + height / 5) + phase[c])
            for c in range(3)
        ],
        axis=-1,
    )
    if kind == "smooth":
        return np.round(smooth).astype(np.uint8)
    return np.clip(smooth + rng.normal(0, 25, smooth.shape), 0, 255).astype(np.uint8)


def reference_processor(config: dict, **overrides) -> Lfm2VlImageProcessor:
    return Lfm2VlImageProcessor(**{**config, **overrides})


def unpad_reference(out) -> dict:
    """The reference's padded output in the port's layout: padding dropped by the mask.

    The reference pads each view at the end to `max_num_patches`; the mask marks the real
    patches. When a view has more patches than that (tiny images upscaled past a low
    max_image_tokens), the reference leaves the view unpadded but its mask is too short, so the
    real patches are taken as the first h * w of each view, and the mask is checked only where it
    is well formed.
    """
    pixel_values = out["pixel_values"].numpy()
    mask = out["pixel_attention_mask"].numpy().astype(bool)
    shapes = out["spatial_shapes"].numpy().tolist()
    views = []
    for view, keep, (h, w) in zip(pixel_values, mask, shapes, strict=True):
        if len(keep) == len(view):
            assert keep[: h * w].all() and not keep[h * w :].any()
        views.append(view[: h * w])
    return {
        "pixel_values": np.concatenate(views),
        "spatial_shapes": shapes,
        "image_rows": [int(r) for r in out["image_rows"]],
        "image_cols": [int(c) for c in out["image_cols"]],
        "image_sizes": [tuple(int(v) for v in s) for s in out["image_sizes"]],
    }


def level_difference(a: np.ndarray, b: np.ndarray, std: float = 0.5) -> float:
    """Largest difference between normalized pixel arrays, in 8-bit levels."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() * std * 255)


def assert_same_as_reference(port_out: ImageBatch, ref_out, std: float = 0.5) -> None:
    ref = unpad_reference(ref_out)
    assert port_out.spatial_shapes.tolist() == ref["spatial_shapes"]
    assert port_out.image_rows == ref["image_rows"]
    assert port_out.image_cols == ref["image_cols"]
    assert port_out.image_sizes == ref["image_sizes"]
    assert port_out.pixel_values.dtype == np.float32
    assert port_out.pixel_values.shape == ref["pixel_values"].shape
    if not np.array_equal(port_out.pixel_values, ref["pixel_values"]):
        share = (port_out.pixel_values != ref["pixel_values"]).mean()
        levels = level_difference(port_out.pixel_values, ref["pixel_values"], std)
        pytest.fail(f"pixel values differ: max {levels:.3f} levels, {share:.3%} of values")


def compare(image, config: dict, reference_input=None, **options) -> ImageBatch:
    """Run port and reference with the same settings; assert identical outputs."""
    port = ImageProcessor(ImageProcessorSettings.from_dict(config), **options)
    ref = reference_processor(config, **options)
    port_out = port(image)
    ref_in = image if reference_input is None else reference_input
    if isinstance(ref_in, np.ndarray):
        ref_in = Image.fromarray(ref_in)
    ref_out = ref(ref_in, return_tensors="pt", return_row_col_info=True)
    assert_same_as_reference(port_out, ref_out, std=port.settings.image_std[0])
    return port_out


# ---------------------------------------------------------------------------------------------
# Sizes: every threshold, tiny and extreme shapes, large photos
# ---------------------------------------------------------------------------------------------

# With the published settings (256/64 tokens, tolerance 2.0, 32-pixel factor):
# - "too large" when round32(h) * round32(w) > 524288; 720 rounds half-even to 704, 721 to 736
# - smart_resize shrinks above 262144 rounded pixels (512x512 is the edge; 528 rounds to 512)
#   and grows below 65536 (239 rounds to 224)
SIZES = [
    (1, 1),
    (2, 3),
    (15, 15),
    (16, 16),
    (31, 33),
    (32, 32),
    (239, 256),
    (240, 256),
    (255, 256),
    (256, 256),
    (257, 255),
    (333, 517),
    (480, 640),
    (511, 513),
    (512, 512),
    (528, 512),
    (529, 512),
    (544, 544),
    (600, 800),
    (640, 800),
    (703, 745),
    (704, 744),
    (719, 719),
    (720, 720),
    (721, 721),
    (720, 730),
    (736, 736),
    (768, 683),
    (1001, 777),
    (1024, 1024),
    (1080, 1920),
    (1920, 1080),
    (1000, 3000),
    (3000, 1000),
    (1, 4000),
    (4000, 3),
    (16, 2000),
    (2000, 17),
    (45, 1500),
    (1500, 45),
    (2047, 1365),
    (3024, 4032),
]


# Every size on both models' settings, except the large photo on the 1.6B settings: one large
# photo per model keeps the suite fast (the 1.6B one is `test_large_photo_is_tiled_...` below).
SIZE_CASES = [
    (size, model)
    for model in ("450M", "1.6B")
    for size in SIZES
    if not (model == "1.6B" and size[0] * size[1] > 3_000_000)
]


@pytest.mark.parametrize(
    ("size", "model"), SIZE_CASES, ids=[f"{h}x{w}-{m}" for (h, w), m in SIZE_CASES]
)
def test_views_and_pixels_match_reference_for_every_size(size, model):
    height, width = size
    kind = ("mixed", "noise", "smooth")[(height + width) % 3]
    compare(make_image(height, width, seed=height * 7919 + width, kind=kind), CONFIGS[model])


def test_large_photo_is_tiled_3x2_with_thumbnail_like_reference():
    out = compare(make_image(3024, 4032, seed=1, kind="noise"), CONFIGS["1.6B"])
    assert (out.image_rows, out.image_cols, out.views_per_image) == ([2], [3], [7])


def test_720_square_is_not_tiled_because_rounding_is_half_to_even():
    settings = ImageProcessorSettings.from_dict(CONFIGS["450M"])
    port = ImageProcessor(settings)
    assert port.num_image_tokens(720, 720) == [256]  # one 512x512 view
    assert len(port.num_image_tokens(721, 721)) > 1  # tiles + thumbnail
    compare(make_image(720, 720, seed=5), CONFIGS["450M"])


def test_lower_max_image_tokens_also_lowers_tiling_threshold():
    image = make_image(480, 640, seed=3)
    default = compare(image, CONFIGS["450M"])
    assert default.views_per_image == [1]
    low = compare(image, CONFIGS["450M"], max_image_tokens=64)
    assert (low.image_rows, low.image_cols, low.views_per_image) == ([2], [3], [7])


def test_token_budget_examples_in_the_cli_help_hold():
    # The numbers `--max-image-tokens --help` and ImageProcessorSettings quote.
    port = ImageProcessor()
    assert sum(port.num_image_tokens(600, 800)) == 234
    assert sum(port.num_image_tokens(600, 800, max_image_tokens=64)) == 1590
    assert port.num_image_tokens(1, 10000) == [1600]  # one view, over the 256 budget
    compare(make_image(1, 10000, seed=2), CONFIGS["450M"])  # as the reference does


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

OPTION_GRID = list(
    itertools.product(
        [True, False],  # do_image_splitting
        [True, False],  # use_thumbnail
        [2, 3],  # resample
        [(64, 256), (32, 128), (100, 400)],  # (min_image_tokens, max_image_tokens)
        [(2, 10), (1, 4), (4, 4)],  # (min_tiles, max_tiles)
    )
)


@pytest.mark.parametrize(
    "splitting,thumbnail,resample,tokens,tiles",
    OPTION_GRID,
    ids=[
        f"split{int(a)}-thumb{int(b)}-rs{c}-tok{d[0]}_{d[1]}-tiles{e[0]}_{e[1]}"
        for a, b, c, d, e in OPTION_GRID
    ],
)
def test_every_option_combination_matches_reference(splitting, thumbnail, resample, tokens, tiles):
    options = dict(
        do_image_splitting=splitting,
        use_thumbnail=thumbnail,
        resample=resample,
        min_image_tokens=tokens[0],
        max_image_tokens=tokens[1],
        min_tiles=tiles[0],
        max_tiles=tiles[1],
    )
    for height, width in ((500, 900), (230, 300)):
        compare(make_image(height, width, seed=height + resample), CONFIGS["450M"], **options)


@pytest.mark.parametrize(
    "options",
    [
        {"max_pixels_tolerance": 1.5},
        {"tile_size": 384},
        {"tile_size": 256, "max_tiles": 12},
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
        {"rescale_factor": 1 / 127.5, "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0] * 3},
        {"do_normalize": False},
        {"encoder_patch_size": 14, "tile_size": 448},
        {"downsample_factor": 1},
    ],
    ids=lambda o: "-".join(o),
)
def test_less_common_options_match_reference(options):
    for height, width in ((700, 900), (300, 420)):
        compare(make_image(height, width, seed=width), CONFIGS["1.6B"], **options)


def test_options_passed_per_call_override_the_settings():
    image = make_image(480, 640, seed=8)
    port = ImageProcessor.from_pretrained(REFERENCE_DIR / "LFM2-VL-450M")
    assert port(image, max_image_tokens=64).views_per_image == [7]
    assert port(image).views_per_image == [1]  # the call did not change the processor


def test_several_images_concatenate_views_in_order():
    images = [
        make_image(*size, seed=i) for i, size in enumerate([(900, 1700), (50, 60), (400, 300)])
    ]
    port = ImageProcessor(ImageProcessorSettings.from_dict(CONFIGS["450M"]))
    out = port(images)
    ref = reference_processor(CONFIGS["450M"])(
        [Image.fromarray(i) for i in images], return_tensors="pt", return_row_col_info=True
    )
    assert_same_as_reference(out, ref)
    assert out.views_per_image == [9, 1, 1]
    assert sum(out.views_per_image) == len(out.spatial_shapes)
    assert out.patches_per_view.sum() == len(out.pixel_values)


# ---------------------------------------------------------------------------------------------
# The resize kernel alone
# ---------------------------------------------------------------------------------------------


def test_resize_is_bit_equal_to_torchvision_antialiased_uint8_resize():
    rng = np.random.default_rng(11)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 400, 2))
        oh, ow = (int(v) for v in rng.integers(1, 500, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for resample, mode in (
            (2, tvF.InterpolationMode.BILINEAR),
            (3, tvF.InterpolationMode.BICUBIC),
        ):
            expected = tvF.resize(
                torch.from_numpy(image).permute(2, 0, 1).contiguous(),
                [oh, ow],
                interpolation=mode,
                antialias=True,
            )
            np.testing.assert_array_equal(
                resize(image, oh, ow, resample), expected.permute(1, 2, 0)
            )


def test_resize_handles_large_downscale_that_needs_float64():
    # 4000 -> 7 taps ~2300 inputs per output: the exact sums no longer fit float32.
    image = make_image(40, 4000, seed=2, kind="noise")
    expected = tvF.resize(
        torch.from_numpy(image).permute(2, 0, 1).contiguous(),
        [40, 7],
        interpolation=tvF.InterpolationMode.BICUBIC,
        antialias=True,
    )
    np.testing.assert_array_equal(resize(image, 40, 7, 3), expected.permute(1, 2, 0))


# ---------------------------------------------------------------------------------------------
# Loading: modes, EXIF, formats
# ---------------------------------------------------------------------------------------------


def _rgba(height: int = 97, width: int = 131) -> np.ndarray:
    rgb = make_image(height, width, seed=4)
    alpha = make_image(height, width, seed=5, kind="noise")[:, :, :1]
    return np.concatenate([rgb, alpha], axis=-1)


def _mode_images() -> dict[str, Image.Image]:
    rgba = _rgba()
    transparent = Image.fromarray(rgba[:, :, :3]).convert("P")
    transparent.info["transparency"] = 3
    return {
        "RGB.png": Image.fromarray(rgba[:, :, :3]),
        "L.png": Image.fromarray(rgba[:, :, 0]),
        "LA.png": Image.fromarray(rgba).convert("LA"),
        "RGBA.png": Image.fromarray(rgba),
        "P.png": Image.fromarray(rgba[:, :, :3]).convert("P"),
        "P-transparency.png": transparent,
        "1.png": Image.fromarray(rgba[:, :, 1]).convert("1"),
        "RGB.jpg": Image.fromarray(rgba[:, :, :3]),
        "L.jpg": Image.fromarray(rgba[:, :, 2]),
        "CMYK.jpg": Image.fromarray(rgba[:, :, :3]).convert("CMYK"),
        "RGB.webp": Image.fromarray(rgba[:, :, :3]),
        "P.gif": Image.fromarray(rgba[:, :, :3]).convert("P"),
    }


@pytest.mark.parametrize("name", sorted(_mode_images()))
def test_image_files_in_every_mode_load_like_the_reference(name, tmp_path):
    image = _mode_images()[name]
    path = tmp_path / name
    image.save(path, **({"transparency": 3} if "transparency" in name else {}))
    # The reference reads paths with torchvision (RGB mode, EXIF applied).
    compare(str(path), CONFIGS["450M"])


@pytest.mark.parametrize("name", sorted(_mode_images()))
def test_pil_images_in_every_mode_convert_like_reference_load_image(name, tmp_path):
    path = tmp_path / name
    _mode_images()[name].save(path)
    image = Image.open(path)
    # The reference image processor cannot take non-RGB PIL images; its loader converts them.
    compare(image, CONFIGS["450M"], reference_input=reference_load_image(Image.open(path)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_the_reference(orientation, tmp_path):
    image = Image.fromarray(make_image(90, 160, seed=orientation))
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"exif{orientation}.jpg"
    image.save(path, exif=exif, quality=92)
    out = compare(str(path), CONFIGS["450M"])
    upright = (160, 90) if orientation >= 5 else (90, 160)  # 5..8 swap width and height
    assert out.image_sizes == [smart_resize(*upright)]
    compare(Image.open(path), CONFIGS["450M"], reference_input=reference_load_image(str(path)))


def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path):
    values = (make_image(40, 50, seed=9, kind="noise")[:, :, 0].astype(np.uint16) * 257) + 100
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    loaded = load_image(str(path))
    expected = (values >> 8).astype(np.uint8)
    np.testing.assert_array_equal(loaded, np.repeat(expected[:, :, None], 3, axis=2))


def test_arrays_in_grayscale_rgb_and_rgba_layouts_load_as_rgb():
    rgba = _rgba(20, 30)
    np.testing.assert_array_equal(load_image(rgba), rgba[:, :, :3])
    np.testing.assert_array_equal(load_image(rgba[:, :, :3]), rgba[:, :, :3])
    gray = rgba[:, :, 0]
    np.testing.assert_array_equal(load_image(gray), np.stack([gray] * 3, axis=-1))
    np.testing.assert_array_equal(load_image(gray[:, :, None]), np.stack([gray] * 3, axis=-1))
    # A grayscale array gives what the reference gives for the equivalent RGB image.
    compare(gray, CONFIGS["450M"], reference_input=np.stack([gray] * 3, axis=-1))


def test_encoded_bytes_load_like_the_file(tmp_path):
    image = Image.fromarray(make_image(60, 80, seed=12))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    np.testing.assert_array_equal(load_image(buffer.getvalue()), np.asarray(image))


def test_loading_a_pil_image_does_not_modify_it(tmp_path):
    image = Image.fromarray(make_image(30, 40, seed=1))
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    opened = Image.open(path)
    assert load_image(opened).shape == (40, 30, 3)
    assert opened.size == (40, 30) and opened.getexif().get(0x0112) == 6


# ---------------------------------------------------------------------------------------------
# Token counts
# ---------------------------------------------------------------------------------------------


def reference_token_count(rows: int, cols: int, image_size, use_thumbnail: bool, s) -> int:
    """`<image>` tokens the reference processor writes for one image (no special tokens)."""
    per_tile = Lfm2VlProcessor._compute_tokens_per_tile(
        None, s.tile_size, s.encoder_patch_size, s.downsample_factor
    )
    for_image = Lfm2VlProcessor._compute_tokens_for_image(
        None, list(image_size), s.encoder_patch_size, s.downsample_factor
    )
    if rows > 1 or cols > 1:
        return rows * cols * per_tile + (for_image if use_thumbnail else 0)
    return for_image


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    height=st.integers(1, 1600),
    width=st.integers(1, 1600),
    max_tokens=st.sampled_from([64, 128, 256, 400]),
    min_tokens=st.sampled_from([16, 32, 64]),
    splitting=st.booleans(),
    thumbnail=st.booleans(),
    tiles=st.sampled_from([(2, 10), (1, 6), (3, 3), (2, 4)]),
    tolerance=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
)
def test_image_token_count_equals_reference_for_random_sizes_and_options(
    height, width, max_tokens, min_tokens, splitting, thumbnail, tiles, tolerance
):
    options = dict(
        max_image_tokens=max_tokens,
        min_image_tokens=min(min_tokens, max_tokens),
        do_image_splitting=splitting,
        use_thumbnail=thumbnail,
        min_tiles=tiles[0],
        max_tiles=tiles[1],
        max_pixels_tolerance=tolerance,
        resample=2,
    )
    image = make_image(height, width, seed=height * width, kind="noise")
    port = ImageProcessor(ImageProcessorSettings.from_dict(CONFIGS["450M"]), **options)
    out = port(image)
    ref = reference_processor(CONFIGS["450M"], **options)(
        Image.fromarray(image), return_tensors="pt", return_row_col_info=True
    )
    rows, cols = int(ref["image_rows"][0]), int(ref["image_cols"][0])
    expected = reference_token_count(rows, cols, ref["image_sizes"][0], thumbnail, port.settings)
    assert_same_as_reference(out, ref)
    from_shapes = sum(image_token_count(h, w, 2) for h, w in out.spatial_shapes.tolist())
    assert from_shapes == sum(out.tokens_per_view)
    if (rows, cols) == (1, 1) and out.spatial_shapes.tolist() != [
        [h // 16 for h in ref["image_sizes"][0].tolist()]
    ]:
        # Reference bug, only with min_tiles=1: a "too large" image whose best grid is 1x1 is
        # resized to one tile_size tile, but the reference processor counts tokens from the
        # smart_resize size, so its text has fewer <image> tokens than the model has features.
        # The port counts what the model produces.
        assert port.settings.min_tiles == 1 and from_shapes != expected
    else:
        assert from_shapes == expected
    assert port.num_image_tokens(height, width) == out.tokens_per_view
    assert out.spatial_shapes.tolist() == ref["spatial_shapes"].tolist()


def test_token_count_rounds_odd_patch_grids_up():
    assert image_token_count(32, 32) == 256
    assert image_token_count(26, 36) == 234
    assert image_token_count(3, 5) == 2 * 3
    assert image_token_count(3, 5, downsample_factor=1) == 15


def test_smart_resize_returns_height_then_width():
    assert smart_resize(480, 640) == (416, 576)
    assert smart_resize(1, 4000) == (32, 4000)


# ---------------------------------------------------------------------------------------------
# Settings from checkpoint files
# ---------------------------------------------------------------------------------------------


def _copy_model(model: str, tmp_path: Path) -> Path:
    folder = tmp_path / model
    folder.mkdir()
    for file in (REFERENCE_DIR / model).iterdir():
        if file.is_file():
            shutil.copy(file, folder / file.name)
    return folder


def _assert_same_settings(port: ImageProcessorSettings, ref: Lfm2VlImageProcessor) -> None:
    for name in SHARED_OPTIONS:
        expected = getattr(ref, name)
        if name in ("image_mean", "image_std"):
            expected = tuple(float(v) for v in expected)
        assert getattr(port, name) == expected, name


@pytest.mark.parametrize("model", ["LFM2-VL-450M", "LFM2-VL-1.6B", "LFM2-VL-3B"])
def test_settings_resolve_like_reference_from_pretrained(model, tmp_path):
    folder = _copy_model(model, tmp_path)
    _assert_same_settings(resolve_settings(folder), Lfm2VlImageProcessor.from_pretrained(folder))


def test_450m_uses_thumbnail_from_preprocessor_config_not_processor_config(tmp_path):
    folder = _copy_model("LFM2-VL-450M", tmp_path)
    assert json.loads((folder / "processor_config.json").read_text())["use_thumbnail"] is False
    assert resolve_settings(folder).use_thumbnail is True


def test_16b_uses_tolerance_from_preprocessor_config_not_processor_config(tmp_path):
    folder = _copy_model("LFM2-VL-1.6B", tmp_path)
    assert json.loads((folder / "processor_config.json").read_text())["max_pixels_tolerance"] == 1.5
    assert resolve_settings(folder).max_pixels_tolerance == 2.0
    assert resolve_settings(folder).resample == 3  # bicubic, although do_resize is false


def test_nested_image_processor_in_processor_config_wins(tmp_path):
    folder = _copy_model("LFM2-VL-450M", tmp_path)
    nested = {**published_config("LFM2-VL-450M"), "use_thumbnail": False, "max_image_tokens": 128}
    processor_config = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(
        json.dumps({**processor_config, "image_processor": nested})
    )
    resolved = resolve_settings(folder)
    assert (resolved.use_thumbnail, resolved.max_image_tokens) == (False, 128)
    _assert_same_settings(resolved, Lfm2VlImageProcessor.from_pretrained(folder))


def test_nested_settings_alone_are_enough(tmp_path):
    folder = tmp_path / "mlx"
    folder.mkdir()
    (folder / "processor_config.json").write_text(
        json.dumps({"image_processor": {"resample": 3, "max_image_tokens": 200}})
    )
    resolved = resolve_settings(folder)
    _assert_same_settings(resolved, Lfm2VlImageProcessor.from_pretrained(folder))
    assert resolved.max_image_tokens == 200


def test_folder_without_image_settings_is_refused_like_reference(tmp_path):
    folder = _copy_model("LFM2.5-VL-1.6B", tmp_path)
    with pytest.raises(OSError):
        Lfm2VlImageProcessor.from_pretrained(folder)
    with pytest.raises(Lfm2VlError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(folder)


def test_null_values_take_the_reference_class_defaults():
    assert (
        ImageProcessorSettings.from_dict({"resample": None, "do_convert_rgb": None}).resample == 2
    )


# ---------------------------------------------------------------------------------------------
# Errors a user can cause
# ---------------------------------------------------------------------------------------------


def test_missing_file_raises_clear_error(tmp_path):
    with pytest.raises(Lfm2VlError, match="not found"):
        load_image(str(tmp_path / "nope.jpg"))


def test_file_that_is_not_an_image_raises_clear_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello")
    with pytest.raises(Lfm2VlError, match="Cannot decode") as error:
        load_image(path)
    assert "notes.jpg" in str(error.value) and "BytesIO" not in str(error.value)
    with pytest.raises(Lfm2VlError, match="Cannot decode the image bytes") as error:
        load_image(b"hello")
    assert "BytesIO" not in str(error.value)


def test_folder_passed_as_an_image_is_reported_as_a_folder(tmp_path):
    with pytest.raises(Lfm2VlError, match="is a folder"):
        load_image(str(tmp_path))


def test_zero_byte_file_is_reported_as_empty(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"")
    with pytest.raises(Lfm2VlError, match=r"photo.png is empty \(0 bytes\)"):
        load_image(str(path))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_raises_clear_error(fmt, tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(make_image(200, 200, seed=1, kind="noise")).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(Lfm2VlError, match="damaged or truncated"):
        ImageProcessor()(str(path))


def test_zero_size_images_raise_clear_error():
    with pytest.raises(Lfm2VlError, match="empty"):
        load_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(Lfm2VlError, match="empty"):
        load_image(Image.new("RGB", (0, 4)))


def test_image_over_pixel_limit_raises_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(Lfm2VlError, match="over the limit"):
        ImageProcessor(max_input_pixels=50_000)(str(path))
    with pytest.raises(Lfm2VlError, match="over the limit"):
        load_image(np.zeros((300, 200, 3), np.uint8), max_input_pixels=50_000)


def test_pillow_decompression_bomb_becomes_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40000 > 2x the limit: PIL refuses
    with pytest.raises(Lfm2VlError, match="too large"):
        load_image(str(path))


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(Lfm2VlError, match="max_image_tokens"):
        ImageProcessor(max_image_token=64)
    with pytest.raises(Lfm2VlError, match="Unknown image option"):
        ImageProcessor()(make_image(10, 10, 0), thumbnail=False)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"resample": 1}, "resample"),
        ({"min_tiles": 5, "max_tiles": 2}, "min_tiles"),
        ({"tile_size": 500}, "multiple"),
        ({"min_image_tokens": 300}, "min_image_tokens"),
        ({"max_image_tokens": 0}, "positive"),
        ({"image_std": [0.5, 0, 0.5]}, "image_std"),
    ],
)
def test_invalid_option_values_raise_clear_error(options, message):
    with pytest.raises(Lfm2VlError, match=message):
        ImageProcessor(**options)


def test_splitting_off_ignores_tile_bounds_like_reference():
    out = ImageProcessor(do_image_splitting=False, min_tiles=5, max_tiles=2)(
        make_image(900, 900, 0)
    )
    assert out.views_per_image == [1]


@pytest.mark.parametrize(
    "bad,message",
    [
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        (np.zeros((3, 10, 10), np.uint8), "transpose"),
        (np.zeros((10, 10, 2), np.uint8), r"\(H, W, 3\)"),
        (12345, "Unsupported image type"),
    ],
)
def test_bad_arrays_and_types_raise_error_naming_the_fix(bad, message):
    with pytest.raises(Lfm2VlError, match=message):
        load_image(bad)


def serve(body: bytes):
    """A running local HTTP server that answers every GET with `body`."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_url_downloads_are_capped(monkeypatch):
    buffer = io.BytesIO()
    Image.fromarray(make_image(64, 64, seed=3, kind="noise")).save(buffer, format="PNG")
    png = buffer.getvalue()
    server = serve(png)
    url = f"http://127.0.0.1:{server.server_address[1]}/photo.png"
    try:
        monkeypatch.setattr(image_processor, "_MAX_URL_BYTES", len(png), raising=False)
        assert load_image(url).shape == (64, 64, 3)  # at the cap: fine
        monkeypatch.setattr(image_processor, "_MAX_URL_BYTES", len(png) - 1, raising=False)
        with pytest.raises(Lfm2VlError, match="larger than .* MB"):
            load_image(url)
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_url_raises_clear_error():
    with pytest.raises(Lfm2VlError, match="Cannot download"):
        load_image("http://127.0.0.1:9/image.png")


def test_empty_image_list_raises_clear_error():
    with pytest.raises(Lfm2VlError, match="No images"):
        ImageProcessor()([])


def test_token_count_formula_matches_reference_for_odd_grids():
    for h, w in ((33, 17), (1, 1), (5, 64)):
        expected = Lfm2VlProcessor._compute_tokens_for_image(None, [h * 16, w * 16], 16, 2)
        assert image_token_count(h, w, 2) == expected == math.ceil(h / 2) * math.ceil(w / 2)
