"""NumPy image preprocessing for LFM2-VL, identical to the reference `Lfm2VlImageProcessor`.

The data path for one image:

    load (path, URL, bytes, PIL.Image or ndarray) -> RGB uint8 with EXIF orientation applied
    -> "too large?" test -> either one view resized by `smart_resize`, or a grid of
       `tile_size` tiles (+ a thumbnail of the `smart_resize` size)
    -> resample with torchvision's antialiased uint8 filter (bit-exact, see `resize`)
    -> rescale + normalize in float32 -> 16x16 patches (py, px, c) per patch, row-major per view

The output (`ImageBatch`) has no padding: every view's patches are concatenated, and
`spatial_shapes` gives each view's patch grid. Pixel values are bit-equal to the reference's
on the CPU kernel it runs on x86 (AVX2/AVX512) and arm64.

A surprising rule of the reference, kept here: an image is "too large" (and so tiled) when its
size rounded to multiples of 32 exceeds `max_image_tokens * 32 * 32 * max_pixels_tolerance`
pixels. Lowering `max_image_tokens` therefore also lowers the tiling threshold: a 640x480 image is
one 480x640 view with the defaults (256 tokens), but with `max_image_tokens=64` it becomes a 3x2
grid of 512x512 tiles plus a thumbnail.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import Lfm2VlError

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray

# PIL's own decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS, ~89.5 MP), applied to every input
# kind (arrays too), so a huge array fails with a clear message instead of exhausting memory.
DEFAULT_MAX_INPUT_PIXELS = 89_478_485

_URL_TIMEOUT_S = 30.0
# The most an image URL may send: far above any photo, and a bound on what a bad link (a video, an
# endless stream) can make the process hold in memory.
_MAX_URL_BYTES = 64 << 20
_EXIF_ORIENTATION = 0x0112


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageProcessorSettings:
    """Every option of the image processor; the defaults are the reference class defaults.

    Checkpoints override them through their processor files (see `from_pretrained`). `resample`
    follows PIL's numbering as the reference does: 2 = bilinear, 3 = bicubic.

    The token budgets work as the reference's, which surprises: `min_image_tokens` and
    `max_image_tokens` bound the tokens of an image encoded as one view and of a tiled image's
    thumbnail. With `do_image_splitting`, `max_image_tokens` also decides tiling: an image
    whose pixels (rounded to multiples of 32) exceed `max_image_tokens x 1024 x
    max_pixels_tolerance` becomes `tile_size` tiles of a fixed 256 tokens each (at 512 pixels)
    plus the thumbnail, so lowering `max_image_tokens` can raise the total (800x600: 234 tokens
    at 256, 1590 at 64). And a view keeps at least 32 pixels a side, so a very thin image
    exceeds the budget (1x10000: one view of 1600 tokens against 256).
    """

    min_image_tokens: int = 64
    max_image_tokens: int = 256
    do_image_splitting: bool = True
    use_thumbnail: bool = True
    min_tiles: int = 2
    max_tiles: int = 10
    tile_size: int = 512
    max_pixels_tolerance: float = 2.0
    resample: int = 2
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    encoder_patch_size: int = 16
    downsample_factor: int = 2
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageProcessorSettings:
        """Settings from a checkpoint's image-processor dict.

        Like the reference: keys it does not know are ignored (`do_resize`, `size`,
        `max_num_patches`, `patch_size`, `image_processor_type`, ...), and a `null` value means
        "use the default".
        """
        known = {f.name for f in dataclasses.fields(cls)}
        return cls().replace(**{k: v for k, v in values.items() if k in known and v is not None})

    def replace(self, **overrides: Any) -> ImageProcessorSettings:
        """A copy with `overrides` applied; unknown names and invalid values raise Lfm2VlError."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise Lfm2VlError(
                f"Unknown image option(s) {', '.join(unknown)}. Valid options: {', '.join(known)}."
            )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        for key in ("image_mean", "image_std"):
            if key in overrides:
                value = overrides[key]
                value = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
                overrides[key] = tuple(float(v) for v in value)
        new = dataclasses.replace(self, **overrides)
        new._validate()
        return new

    def _validate(self) -> None:
        def fail(message: str) -> None:
            raise Lfm2VlError(f"Invalid image option: {message}")

        positive_ints = (
            "min_image_tokens",
            "max_image_tokens",
            "min_tiles",
            "max_tiles",
            "tile_size",
            "encoder_patch_size",
            "downsample_factor",
            "max_input_pixels",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}.")
        if self.resample not in (2, 3):
            fail(f"resample must be 2 (bilinear) or 3 (bicubic), got {self.resample!r}.")
        if not self.max_pixels_tolerance > 0:
            fail(f"max_pixels_tolerance must be > 0, got {self.max_pixels_tolerance!r}.")
        if self.min_image_tokens > self.max_image_tokens:
            fail(
                f"min_image_tokens ({self.min_image_tokens}) must not exceed "
                f"max_image_tokens ({self.max_image_tokens})."
            )
        if self.do_image_splitting and self.min_tiles > self.max_tiles:
            fail(f"min_tiles ({self.min_tiles}) must not exceed max_tiles ({self.max_tiles}).")
        if self.tile_size % self.encoder_patch_size:
            fail(
                f"tile_size ({self.tile_size}) must be a multiple of encoder_patch_size "
                f"({self.encoder_patch_size})."
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            fail("image_mean and image_std need one value per RGB channel.")
        if self.do_normalize and any(s == 0 for s in self.image_std):
            fail("image_std must not contain 0.")


def resolve_settings(folder: str | os.PathLike) -> ImageProcessorSettings:
    """Read a checkpoint folder's image settings, choosing the file the way the reference does.

    The rule (`transformers` `ImageProcessingMixin.get_image_processor_dict`, used by both
    `Lfm2VlImageProcessor.from_pretrained` and `AutoProcessor.from_pretrained`):

    1. If `processor_config.json` has an `"image_processor"` object (LFM2.5 and MLX/mlx-vlm
       repos), that object is the whole configuration and `preprocessor_config.json` is ignored.
    2. Otherwise `preprocessor_config.json` is the whole configuration.
    3. Nothing else is read: the top-level keys of `processor_config.json` and the values in
       `config.json` never reach the image processor. So LFM2-VL-450M uses a thumbnail
       (`use_thumbnail: true` in preprocessor_config.json; false in the other two files), and
       LFM2-VL-1.6B tiles with `max_pixels_tolerance` 2.0 (1.5 in the other two files).
    4. `do_resize: false` is shipped but ignored: the reference always resizes.
    5. Keys set to null, and keys the file omits, take the reference class defaults, which differ
       from the checkpoints in one place that matters: `resample` defaults to 2 (bilinear) while
       the published files say 3 (bicubic).

    With neither file, the reference refuses to load; so does this (Lfm2VlError).
    """
    folder = Path(folder)
    values = None
    processor_file = folder / "processor_config.json"
    if processor_file.is_file():
        nested = _read_json(processor_file).get("image_processor")
        if isinstance(nested, dict):
            values = nested
    preprocessor_file = folder / "preprocessor_config.json"
    if values is None and preprocessor_file.is_file():
        values = _read_json(preprocessor_file)
    if values is None:
        raise Lfm2VlError(
            f"No image processor settings in {folder}: expected preprocessor_config.json or an "
            '"image_processor" object in processor_config.json. Point to a complete LFM2-VL '
            "checkpoint folder."
        )
    return ImageProcessorSettings.from_dict(values)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Lfm2VlError(f"Cannot read {path}: {e}. Re-download the checkpoint file.") from e
    if not isinstance(data, dict):
        raise Lfm2VlError(f"{path} does not hold a JSON object. Re-download the checkpoint file.")
    return data


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_image(source: ImageInput, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> np.ndarray:
    """Decode `source` to an RGB uint8 array (H, W, 3), upright.

    - path, `http(s)://` URL or encoded bytes: decoded by Pillow, EXIF orientation applied and
      converted with Pillow's `convert("RGB")`. This equals what the reference reads from a path
      or URL (torchvision's `decode_image(mode=RGB, apply_exif_orientation=True)`) and from
      `transformers.image_utils.load_image`, for every mode they both support: RGB, L, LA, P
      (with or without transparency), 1-bit, CMYK JPEG, RGBA (alpha dropped, not composited).
    - PIL.Image: the same (what `load_image` does; the reference image processor given a non-RGB
      PIL image fails, so there is nothing else to match).
    - 16-bit images (modes I;16*, I): scaled to 8 bits by `>> 8`, torchvision's uint16 -> uint8
      rule. Here the reference has no usable behaviour: Pillow's convert clips them to 255, and
      the reference path loader keeps 16-bit values that it then normalizes as if 8-bit.
    - ndarray: uint8 (H, W) grayscale, or (H, W, C) with C = 1 (gray), 3 (RGB) or 4 (RGBA,
      alpha dropped like the path loaders do). Channels-last only.
    """
    return np.stack(load_planes(source, max_input_pixels), axis=-1)


def load_planes(
    source: ImageInput, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS
) -> list[np.ndarray]:
    """`load_image`, as three (H, W) uint8 planes R, G, B: the layout the resampler reads."""
    return _load_rows(source, max_input_pixels).planes()


class RgbRows:
    """A loaded image's R, G and B planes, read by ranges of rows.

    Arrays are sliced. A PIL image is exported band by band (Pillow packs one band about 5x
    faster than it interleaves RGB: 4032x3024, 3 x 3.5 ms against 49 ms) and, when the resampler
    reads it in row stripes, stripe by stripe: a large photo then never exists as three full
    uint8 planes (36 MB for 4032x3024) beside Pillow's own copy, which saves the memory and,
    more costly, the page faults of touching it.
    """

    def __init__(self, planes: list[np.ndarray] | None = None, image: Image.Image | None = None):
        self._planes = planes
        self._image = image
        self.height, self.width = planes[0].shape if planes else (image.height, image.width)
        self.channels = len(planes) if planes else 3

    def rows(self, r0: int, r1: int) -> list[np.ndarray]:
        """Rows [r0, r1) of each plane, (r1 - r0, width) uint8."""
        if self._planes is not None:
            return [plane[r0:r1] for plane in self._planes]
        image = self._image
        if (r0, r1) != (0, self.height):
            image = image.crop((0, r0, self.width, r1))
        bands = [image.tobytes("raw", band) for band in "RGB"]
        return [np.frombuffer(band, np.uint8).reshape(r1 - r0, self.width) for band in bands]

    def planes(self) -> list[np.ndarray]:
        """The whole planes (exported once and kept, for a PIL image)."""
        if self._planes is None:
            self._planes = self.rows(0, self.height)
        return self._planes


def _load_rows(source: ImageInput, max_input_pixels: int) -> RgbRows:
    """`load_image` without the export of the pixels (see `RgbRows`)."""
    if isinstance(source, np.ndarray):
        array = _check_size(_array_to_rgb(source), max_input_pixels)
        return RgbRows([array[:, :, c] for c in range(3)])
    if isinstance(source, Image.Image):
        return _pil_to_rows(source, max_input_pixels, "the PIL image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), "the image bytes", max_input_pixels)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and text.startswith(("http://", "https://")):
            return _decode(_fetch_url(text), text, max_input_pixels)
        return _decode(_read_file(text), text, max_input_pixels)
    raise Lfm2VlError(
        f"Unsupported image type {type(source).__name__}: pass a file path, an http(s) URL, "
        "encoded image bytes, a PIL.Image or a uint8 NumPy array (H, W, 3)."
    )


def _read_file(path: str | bytes) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise Lfm2VlError(f"Image file not found: {path!r}. Check the path.") from e
    except IsADirectoryError as e:
        raise Lfm2VlError(f"Image path {path!r} is a folder. Pass an image file.") from e
    except OSError as e:
        raise Lfm2VlError(f"Cannot read image file {path!r}: {e}.") from e


def _fetch_url(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=_URL_TIMEOUT_S) as response:
            # One byte over the cap tells a response at the cap from a larger one.
            data = response.read(_MAX_URL_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise Lfm2VlError(
            f"Cannot download image {url}: {e}. Check the URL and the network, or pass a "
            "local file."
        ) from e
    if len(data) > _MAX_URL_BYTES:
        raise Lfm2VlError(
            f"The image at {url} is larger than {_MAX_URL_BYTES >> 20} MB, the most this "
            "downloads. Download it yourself and pass the file (or a smaller copy)."
        )
    return data


def _decode(data: bytes, name: str, max_input_pixels: int) -> RgbRows:
    if not data:
        raise Lfm2VlError(f"{name} is empty (0 bytes). Pass an image file.")
    buffer = io.BytesIO(data)
    try:
        image = Image.open(buffer)
    except Image.DecompressionBombError as e:
        raise Lfm2VlError(f"{name} is too large to decode safely ({e}). Downscale it first.") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        # Pillow names the buffer it read ("<_io.BytesIO object at 0x...>"); the name says more.
        reason = str(e).replace(f" {buffer!r}", "")
        raise Lfm2VlError(
            f"Cannot decode {name}: not a supported image file ({reason}). "
            "Use a JPEG, PNG, WebP, GIF, BMP or TIFF file."
        ) from e
    return _pil_to_rows(image, max_input_pixels, name)


def _pil_to_rows(image: Image.Image, max_input_pixels: int, name: str) -> RgbRows:
    width, height = image.size
    # Check before decoding the pixel data: Image.open only read the header.
    _check_dims(height, width, max_input_pixels, name)
    try:
        image.load()
        # Transposing only when the tag asks for it avoids copying upright images (and never
        # changes a caller's PIL image in place).
        if image.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):
            image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            array = np.asarray(image)
            array = np.clip(array.astype(np.int64), 0, 65535) >> 8
            rgb = _array_to_rgb(array.astype(np.uint8))
            return RgbRows([rgb[:, :, c] for c in range(3)])
        if image.mode != "RGB":
            image = image.convert("RGB")
        return RgbRows(image=image)
    except Image.DecompressionBombError as e:
        raise Lfm2VlError(f"{name} is too large to decode safely ({e}). Downscale it first.") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise Lfm2VlError(
            f"Cannot decode {name}: the file is damaged or truncated ({e}). Re-export the image."
        ) from e


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise Lfm2VlError(
            f"Image arrays must be uint8 with values 0..255, got {array.dtype}. Convert first, "
            "e.g. (x * 255).round().clip(0, 255).astype(np.uint8) for floats in [0, 1]."
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise Lfm2VlError(
            f"Image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape "
            f"{array.shape}. For channels-first data pass array.transpose(1, 2, 0)."
        )
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return array


def _check_dims(height: int, width: int, max_input_pixels: int, name: str) -> None:
    if height < 1 or width < 1:
        raise Lfm2VlError(f"{name} is empty ({width}x{height} pixels). Pass a non-empty image.")
    if height * width > max_input_pixels:
        raise Lfm2VlError(
            f"{name} has {width}x{height} = {height * width:,} pixels, over the limit of "
            f"{max_input_pixels:,}. Downscale it first, or raise max_input_pixels if you trust it."
        )


def _check_size(array: np.ndarray, max_input_pixels: int) -> np.ndarray:
    _check_dims(array.shape[0], array.shape[1], max_input_pixels, "the image array")
    return array


# --------------------------------------------------------------------------------------------
# Geometry: the reference's decisions, ported line by line
# --------------------------------------------------------------------------------------------


def _round_by_factor(number: float, factor: int) -> int:
    # Python's round: half to even, as the reference (so 720 / 32 = 22.5 rounds to 22).
    return round(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    *,
    downsample_factor: int = 2,
    min_image_tokens: int = 64,
    max_image_tokens: int = 256,
    encoder_patch_size: int = 16,
) -> tuple[int, int]:
    """Size (height, width) of the single view / thumbnail: multiples of patch * downsample.

    Note the order: (height, width); the reference method returns (width, height).
    """
    total_factor = encoder_patch_size * downsample_factor
    min_pixels = min_image_tokens * encoder_patch_size**2 * downsample_factor**2
    max_pixels = max_image_tokens * encoder_patch_size**2 * downsample_factor**2
    h_bar = max(total_factor, _round_by_factor(height, total_factor))
    w_bar = max(total_factor, _round_by_factor(width, total_factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(total_factor, math.floor(height / beta / total_factor) * total_factor)
        w_bar = max(total_factor, math.floor(width / beta / total_factor) * total_factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / total_factor) * total_factor
        w_bar = math.ceil(width * beta / total_factor) * total_factor
    return h_bar, w_bar


def is_image_too_large(height: int, width: int, settings: ImageProcessorSettings) -> bool:
    """The reference's tiling test (note the `encoder_patch_size` floor, not 32)."""
    s = settings
    total_factor = s.encoder_patch_size * s.downsample_factor
    h_bar = max(s.encoder_patch_size, _round_by_factor(height, total_factor))
    w_bar = max(s.encoder_patch_size, _round_by_factor(width, total_factor))
    limit = s.max_image_tokens * s.encoder_patch_size**2 * s.downsample_factor**2
    return h_bar * w_bar > limit * s.max_pixels_tolerance


@lru_cache(maxsize=64)
def _target_ratios(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    # sorted(set(...)) exactly as the reference: ties in w*h keep set-iteration order, which
    # decides the grid when two ratios are equally close.
    ratios = [
        (w, h)
        for n in range(min_tiles, max_tiles + 1)
        for w in range(1, n + 1)
        for h in range(1, n + 1)
        if min_tiles <= w * h <= max_tiles
    ]
    return sorted(set(ratios), key=lambda x: x[0] * x[1])


def tile_grid(
    height: int, width: int, min_tiles: int, max_tiles: int, tile_size: int
) -> tuple[int, int]:
    """(rows, cols) of the tile grid whose aspect ratio is closest to the image's."""
    aspect_ratio = width / height
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in _target_ratios(min_tiles, max_tiles):
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff = diff
            best = ratio
        elif diff == best_diff and area > 0.5 * (tile_size * tile_size * ratio[0] * ratio[1]):
            best = ratio
    grid_width, grid_height = best
    return grid_height, grid_width


@dataclass(frozen=True)
class ImageLayout:
    """The geometry decided for one image, before any pixel work."""

    rows: int  # tile grid rows (1 when not tiled)
    cols: int
    resized: tuple[int, int]  # (height, width) the whole image is resized to
    thumbnail: tuple[int, int] | None  # (height, width), only when tiled with a thumbnail
    image_size: tuple[int, int]  # smart_resize size: the reference's `image_sizes` entry

    @property
    def view_shapes(self) -> list[tuple[int, int]]:
        """(height, width) in pixels of each view, in output order."""
        tile = (self.resized[0] // self.rows, self.resized[1] // self.cols)
        shapes = [tile] * (self.rows * self.cols)
        return shapes + ([self.thumbnail] if self.thumbnail else [])


def plan_image(height: int, width: int, settings: ImageProcessorSettings) -> ImageLayout:
    """Tiling decision and sizes for a `height` x `width` image (reference `resize_and_split`)."""
    s = settings
    min_tiles, max_tiles = (s.min_tiles, s.max_tiles) if s.do_image_splitting else (1, 1)
    splitting = not min_tiles == max_tiles == 1
    new_size = smart_resize(
        height,
        width,
        downsample_factor=s.downsample_factor,
        min_image_tokens=s.min_image_tokens,
        max_image_tokens=s.max_image_tokens,
        encoder_patch_size=s.encoder_patch_size,
    )
    if splitting and is_image_too_large(height, width, s):
        rows, cols = tile_grid(height, width, min_tiles, max_tiles, s.tile_size)
        thumbnail = new_size if s.use_thumbnail and rows * cols != 1 else None
        return ImageLayout(
            rows, cols, (rows * s.tile_size, cols * s.tile_size), thumbnail, new_size
        )
    return ImageLayout(1, 1, new_size, None, new_size)


def image_token_count(h_patches: int, w_patches: int, downsample_factor: int = 2) -> int:
    """Number of `<image>` tokens for a view of h_patches x w_patches encoder patches.

    The reference processor's formula: ceil(h / d) * ceil(w / d) (pixel unshuffle by d).
    """
    return math.ceil(h_patches / downsample_factor) * math.ceil(w_patches / downsample_factor)


# --------------------------------------------------------------------------------------------
# Resampling: torchvision's antialiased resize on uint8, bit-exact
# --------------------------------------------------------------------------------------------
#
# The reference calls torchvision `resize(uint8 CHW tensor, antialias=True)`, which on CPU runs
# ATen's uint8 kernel (`upsample_avx_bilinear_bicubic_uint8`; the generic fallback computes the
# same integers). Per axis it builds Pillow-style filter weights in float64 -- support =
# (taps / 2) * scale when downscaling, bicubic with a = -0.5, bilinear triangle, normalized to
# sum 1 -- then quantizes them to int16 with `precision` fractional bits (the largest that keeps
# the biggest weight below 2**15), and computes
#     out = clamp((sum_k pixel_k * w_k + 2**(precision - 1)) >> precision, 0, 255)
# horizontally first, then vertically on the rounded uint8 result. An axis whose size does not
# change is skipped.
#
# The sums are exact integers, so any exact way of computing them gives the same bits. Here they
# run through BLAS: the output positions along an axis are grouped into windows over the input,
# and one batched matmul does all windows. Pixels are centered (x - 128) so that in float32 every
# partial sum stays below 2**24 and is exact; when a plan cannot guarantee that (large
# downscales) it computes in float64, where the sums are always exact.


def _cubic_filter(x: np.ndarray) -> np.ndarray:
    a = -0.5  # Keys' a = -0.5, the value ATen's antialiased bicubic (like Pillow) uses
    x = np.abs(x)
    out = np.zeros_like(x)
    near = x < 1.0
    far = (x >= 1.0) & (x < 2.0)
    xn, xf = x[near], x[far]
    # Same operation order as ATen's cubic_convolution1/2, for identical float64 weights.
    out[near] = ((a + 2) * xn - (a + 3)) * xn * xn + 1
    out[far] = ((a * xf - 5 * a) * xf + 8 * a) * xf - 4 * a
    return out


def _linear_filter(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _int16_weights(in_size: int, out_size: int, resample: int):
    """ATen `_compute_indices_int16_weights_aa`: (xmin, xsize, int weights (out, K), precision).

    Also returns `first`, each output's first tap before clipping to the input (may be < 0):
    unlike `xmin` it advances evenly, which the window layout of `_AxisPlan` relies on.
    """
    filter_fn, taps = (_cubic_filter, 4) if resample == 3 else (_linear_filter, 2)
    scale = in_size / out_size
    support = taps * 0.5 * scale if scale >= 1.0 else taps * 0.5
    max_taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size) + 0.5)
    # Casts truncate toward zero, as the C++ static_cast<int64_t> does.
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xsize = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    j = np.arange(max_taps)
    w = filter_fn((j[None, :] + xmin[:, None] - center[:, None] + 0.5) * invscale)
    w[j[None, :] >= xsize[:, None]] = 0.0
    total = np.zeros(out_size)
    for k in range(max_taps):  # sequential sum, in the kernel's order
        total = total + w[:, k]
    w = np.divide(w, total[:, None], out=w, where=total[:, None] != 0.0)
    w_max = float(w.max())
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * (1 << precision)
    wi = np.trunc(np.where(w < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64)
    first = np.floor(center - support + 0.5).astype(np.int64)
    return xmin, xsize, wi, precision, first


# Each BLAS call stays under OpenBLAS's single-thread threshold (M*N*K <= 2**18). Threads on
# calls this small cost more than they give, badly so when other processes load the cores.
_CALL_WORK = 1 << 18
# Cost of one more window (one more small BLAS call), in multiply-adds per row, when choosing
# how many outputs (up to 16) a window holds: fewer outputs waste fewer taps, but more windows
# mean more and narrower BLAS calls. 4096 measured best for a 4032x3024 photo (rows pass
# 64 -> 49 ms against windows of ~8 outputs); 64 was 2x slower than that.
_WINDOW_COST = 4096
_F32_EXACT = 1 << 24  # integers up to 2**24 are exact in float32


class _AxisPlan:
    """Weights and windows to resample one axis from `in_size` to `out_size` samples.

    Output x is sum_k w[x, k] * input[xmin[x] + k]. Outputs are grouped by window: the input
    gets `lead` zeros in front, window j covers padded inputs [j * stride, j * stride + length),
    and output x goes to the window its unclipped first tap falls in, so all its taps lie inside.
    (Grouping by the clipped `xmin` would crowd the first outputs, all at 0, into window 0.)
    `weights[j, slot, :]` holds the taps of the `slot`-th output of window j; one batched matmul
    over a strided view of the input then computes every output (plus a few unused slots,
    dropped by `gather`).

    The weights are the int16 weights times 2**-precision, which is exact, so the matmul gives
    S * 2**-precision for the kernel's integer sum S, which `_round_to_uint8` turns into
    clamp(floor((S + 2**(p-1)) * 2**-p), 0, 255) with one addition of `offset`. The dtype:
    - float32, pixels as is, when every |partial sum| + 2**(p-1) <= 2**24: then
      S * 2**-p + 0.5 is exact and truncating it (after clamping at 0) is the kernel's shift.
    - float32, pixels centered (x - 128), when 128 * sum|w| + 2**p <= 2**24: the sum is then
      S_c * 2**-p, exact, and offset = (128 * sum(w) + 2**(p-1)) * 2**-p adds the rest back.
      Since sum|w| >= 2**p this case implies p <= 16, so every value in [0, 256) is a multiple
      of 2**-p with at most 24 significant bits: the addition is exact wherever the result
      lands in range, and the rounding of a result out of range cannot bring it back in.
    - float64 otherwise, pixels as is: every sum is exact far below 2**53.
    """

    def __init__(self, in_size: int, out_size: int, resample: int):
        xmin, xsize, wi, precision, first = _int16_weights(in_size, out_size, resample)
        taps = wi.shape[1]
        lead = max(0, -int(first[0]))
        candidates = [
            self._layout(first + lead, taps, max(1, round(k * in_size / out_size)))
            for k in range(1, 17)
        ]
        stride, window, slot, per_window, num_windows, length = min(
            candidates, key=lambda c: c[4] * (c[3] * c[5] + _WINDOW_COST)
        )
        weights = np.zeros((num_windows, per_window, length))
        cols = xmin[:, None] + lead - window[:, None] * stride + np.arange(taps)[None, :]
        keep = np.arange(taps)[None, :] < xsize[:, None]
        assert 0 <= cols[keep].min() and cols[keep].max() < length
        rows = np.broadcast_to(np.arange(out_size)[:, None], cols.shape)
        weights[window[rows[keep]], slot[rows[keep]], cols[keep]] = wi[keep]
        weights *= 2.0**-precision

        abs_sum = int(np.abs(wi).sum(axis=1).max())
        half = 1 << (precision - 1)
        if 255 * abs_sum + half <= _F32_EXACT:
            self.dtype, self.center = np.float32, 0
        elif 128 * abs_sum + (1 << precision) <= _F32_EXACT:
            self.dtype, self.center = np.float32, 128
        else:
            self.dtype, self.center = np.float64, 0
        # The rounding constant per output, in window-slot layout (unused slots get 0).
        offset = np.zeros(num_windows * per_window)
        offset[window * per_window + slot] = (self.center * wi.sum(axis=1) + half) * 2.0**-precision
        self.offset = offset.astype(self.dtype)
        assert np.array_equal(self.offset, offset)  # exact in float32 too (see above)
        self.weights = weights.astype(self.dtype)  # (windows, per_window, length)
        self.weights_t = np.ascontiguousarray(self.weights.transpose(0, 2, 1))
        self.stride = stride
        self.length = length
        self.lead = lead
        # Padded input length the windows span (zeros past the end), at least the whole input.
        self.padded = max((num_windows - 1) * stride + length, lead + in_size)
        # Output x -> its window-slot position; None when every slot holds an output in order.
        gather = window * per_window + slot
        identity = len(gather) == num_windows * per_window
        self.gather = None if identity else gather
        self.in_size = in_size
        self.out_size = out_size

    @staticmethod
    def _layout(start: np.ndarray, taps: int, stride: int):
        """Windows of `stride` for outputs whose (padded) first taps are `start`."""
        window = start // stride
        slot = np.arange(len(start)) - np.searchsorted(window, window)  # rank within its window
        return stride, window, slot, int(slot.max()) + 1, int(window[-1]) + 1, stride + taps - 1


_THREADS = min(4, os.cpu_count() or 1)


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_THREADS, thread_name_prefix="lfm2vl-resize")


def _run_chunks(run, tasks: list) -> None:
    """Run independent chunks of a resize pass, on several cores when the image is large.

    Each chunk's BLAS call stays single-threaded (`_CALL_WORK`), and NumPy releases the GIL in
    its loops, so chunks spread over threads; chunks write disjoint output slices.
    """
    if len(tasks) < 4 or _THREADS == 1:
        for task in tasks:
            run(*task)
        return
    for future in [_pool().submit(run, *task) for task in tasks]:
        future.result()


@lru_cache(maxsize=128)
def _axis_plan(in_size: int, out_size: int, resample: int) -> _AxisPlan:
    return _AxisPlan(in_size, out_size, resample)


def _round_to_uint8(sums: np.ndarray, plan: _AxisPlan, axis: int, out: np.ndarray) -> None:
    """Scaled sums in window-slot layout along `axis` -> `out` (uint8), rounded as the kernel.

    Clamping to [0, 255] then truncating (the cast) equals the kernel's floor-shift and
    saturation; see `_AxisPlan` for why the one addition is exact.
    """
    shape = [1, 1]
    shape[axis] = -1
    sums += plan.offset.reshape(shape)
    np.clip(sums, 0, 255, out=sums)
    if plan.gather is None:
        np.copyto(out, sums, casting="unsafe")
    else:
        out[...] = np.take(sums, plan.gather, axis=axis)


def _float_input(
    x: np.ndarray, dtype: type, center: int, shape: tuple[int, int], at: tuple[int, int]
) -> np.ndarray:
    """x (uint8) minus `center`, copied at offset `at` into a zero float array of `shape`."""
    buf = np.empty(shape, dtype)
    r0, c0 = at
    r1, c1 = r0 + x.shape[0], c0 + x.shape[1]
    inner = buf[r0:r1, c0:c1]
    inner[...] = x
    if center:
        inner -= center
    buf[:r0] = 0
    buf[r1:] = 0
    buf[r0:r1, :c0] = 0
    buf[r0:r1, c1:] = 0
    return buf


def _resample_rows(source: RgbRows, plans: list[_AxisPlan]) -> list[np.ndarray]:
    """Horizontal pass: resample axis 1 of each (rows, in) uint8 plane with each plan.

    Returns one (planes, rows, out) array per plan. The plans share the input, read and
    converted once per row chunk (for each (dtype, center) they need).
    """
    rows = source.height
    outs = [np.empty((source.channels, rows, plan.out_size), np.uint8) for plan in plans]
    chunk = max(1, min(_CALL_WORK // (p.length * p.weights.shape[1]) for p in plans))
    # One buffer layout for all plans: the input starts at column `lead`, and each plan's
    # windows start where its own lead of zeros does.
    lead = max(p.lead for p in plans)
    width = lead + max(p.padded - p.lead for p in plans)

    def run(r0: int) -> None:
        for index, xr in enumerate(source.rows(r0, min(r0 + chunk, rows))):
            run_plane(index, r0, xr)

    def run_plane(index: int, r0: int, xr: np.ndarray) -> None:
        n = xr.shape[0]
        converted: dict[tuple[type, int], np.ndarray] = {}
        for plan, out in zip(plans, outs, strict=True):
            key = (plan.dtype, plan.center)
            if key not in converted:
                converted[key] = _float_input(xr, plan.dtype, plan.center, (n, width), (0, lead))
            buf = converted[key]
            item = buf.itemsize
            num_windows, per_window, _ = plan.weights.shape
            windows = as_strided(
                buf[:, lead - plan.lead :],
                shape=(num_windows, n, plan.length),
                strides=(plan.stride * item, width * item, item),
                writeable=False,
            )
            sums = np.empty((n, num_windows, per_window), plan.dtype)
            np.matmul(windows, plan.weights_t, out=sums.transpose(1, 0, 2))
            _round_to_uint8(sums.reshape(n, -1), plan, 1, out[index, r0 : r0 + n])

    _run_chunks(run, [(r0,) for r0 in range(0, rows, chunk)])
    return outs


def _resample_columns(planes: Sequence[np.ndarray], plan: _AxisPlan) -> np.ndarray:
    """Vertical pass: resample axis 0 of each (in, cols) uint8 plane -> (planes, out, cols)."""
    cols = planes[0].shape[1]
    out = np.empty((len(planes), plan.out_size, cols), np.uint8)
    num_windows, per_window, _ = plan.weights.shape
    chunk = max(1, _CALL_WORK // (plan.length * per_window))

    def run(index: int, c0: int) -> None:
        xc = planes[index][:, c0 : c0 + chunk]
        n = xc.shape[1]
        buf = _float_input(xc, plan.dtype, plan.center, (plan.padded, n), (plan.lead, 0))
        item = buf.itemsize
        windows = as_strided(
            buf,
            shape=(num_windows, plan.length, n),
            strides=(plan.stride * n * item, n * item, item),
            writeable=False,
        )
        sums = np.matmul(plan.weights, windows)  # (windows, per_window, n)
        _round_to_uint8(sums.reshape(-1, n), plan, 0, out[index, :, c0 : c0 + n])

    _run_chunks(run, [(i, c0) for i in range(len(planes)) for c0 in range(0, cols, chunk)])
    return out


def resize_planes_many(
    planes: Sequence[np.ndarray] | RgbRows, sizes: list[tuple[int, int]], resample: int = 3
) -> list[np.ndarray]:
    """Resize uint8 RGB planes (a (3, H, W) array, a list of three (H, W) arrays or an
    `RgbRows`) to each (height, width) in `sizes`, bit-equal to torchvision's
    `resize(..., antialias=True)` on uint8 CPU tensors (2 bilinear, 3 bicubic). Returns
    (3, height, width) arrays.

    Several sizes of one image share the reading and conversion work of the horizontal pass.
    """
    source = planes if isinstance(planes, RgbRows) else RgbRows(list(planes))
    return [
        x if isinstance(x, np.ndarray) else np.stack(x) for x in _resize(source, sizes, resample)
    ]


def _resize(
    source: RgbRows, sizes: list[tuple[int, int]], resample: int
) -> list[np.ndarray | list[np.ndarray]]:
    """`resize_planes_many`, but a size equal to the input's gives the planes as they are."""
    in_h, in_w = source.height, source.width
    widths = sorted({w for _, w in sizes if w != in_w})
    plans = [_axis_plan(in_w, w, resample) for w in widths]
    passes = _resample_rows(source, plans) if plans else []
    by_width: dict[int, Sequence[np.ndarray]] = dict(zip(widths, passes, strict=True))
    results = []
    for height, width in sizes:
        x = by_width[width] if width in by_width else source.planes()
        if height != in_h:
            x = _resample_columns(x, _axis_plan(in_h, height, resample))
        results.append(x)
    return results


def resize_planes(planes: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """Resize (C, H, W) uint8 planes to (C, height, width); see `resize_planes_many`."""
    return resize_planes_many(planes, [(height, width)], resample)[0]


def resize(image: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """Resize an (H, W, C) uint8 image; see `resize_planes`."""
    planes = resize_planes([image[:, :, c] for c in range(image.shape[2])], height, width, resample)
    return planes.transpose(1, 2, 0)


# --------------------------------------------------------------------------------------------
# Normalize + patchify
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _value_table(s: ImageProcessorSettings) -> np.ndarray:
    """(3, 256) float32: the normalized value of every uint8 level, per channel.

    The arithmetic is the reference's, in float32: it fuses rescale and normalize into
    mean' = float32(mean) * float32(1 / rescale_factor) (the same for std), then computes
    (x - mean') / std' per channel. A uint8 input has only 256 values, so computing them once
    and looking them up gives the same floats at a fraction of the cost.
    """
    levels = np.broadcast_to(np.arange(256, dtype=np.float32), (3, 256)).copy()
    if s.do_normalize:
        mean = np.asarray(s.image_mean, np.float32)
        std = np.asarray(s.image_std, np.float32)
        if s.do_rescale:
            inverse = np.float32(1.0 / s.rescale_factor)
            mean, std = mean * inverse, std * inverse
        levels -= mean[:, None]
        levels /= std[:, None]
    elif s.do_rescale:
        levels *= np.float32(s.rescale_factor)
    return levels


def _write_patches(
    view: np.ndarray | list[np.ndarray], table: np.ndarray, patch: int, out: np.ndarray
) -> None:
    """Normalize a (C, H, W) uint8 view (or its C planes) through `table` (`_value_table`)
    into `out`.

    `out` is (h * w, patch * patch * C): patches row-major over the grid, each laid out
    (py, px, c).
    """
    channels, (height, width) = len(view), view[0].shape
    h, w = height // patch, width // patch
    # Reorder the uint8 pixels (1 byte each, not 4) into patch layout, then look up the floats.
    # Interleaving the channels first keeps both copies sequential (3x faster than one
    # 5-axis transpose).
    interleaved = np.empty((height, width, channels), np.uint8)
    for c in range(channels):
        interleaved[:, :, c] = view[c]
    patches = interleaved.reshape(h, patch, w, patch * channels).transpose(0, 2, 1, 3)
    target = out.reshape(h, w, patch, patch * channels)
    # mode="clip": the indices are in range by construction, and the default mode buffers `out`.
    if (table == table[0]).all():  # one table for all channels, as LFM2-VL's 0.5 mean and std
        np.take(table[0], np.ascontiguousarray(patches), out=target, mode="clip")
    else:
        index = patches.astype(np.intp) + np.tile(np.arange(channels) * 256, patch)
        np.take(table.reshape(-1), index, out=target, mode="clip")


# --------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageBatch:
    """Preprocessed images, without padding.

    pixel_values: float32 (total_patches, patch * patch * 3): every view's patches, views in
        order (per image: its tiles row-major then its thumbnail, or its single view), each view's
        patches row-major over its grid, each patch laid out (py, px, c).
    spatial_shapes: int32 (num_views, 2): (h_patches, w_patches) of each view.
    image_rows, image_cols: tile grid per image (1, 1 when not tiled).
    image_sizes: (height, width) per image of the `smart_resize` size (the single view, or the
        thumbnail size when tiled, whether or not a thumbnail is produced), as the reference.
    views_per_image: number of views of each image.
    tokens_per_view: `<image>` tokens per view after pixel unshuffle (`image_token_count`).
    """

    pixel_values: np.ndarray
    spatial_shapes: np.ndarray
    image_rows: list[int]
    image_cols: list[int]
    image_sizes: list[tuple[int, int]]
    views_per_image: list[int]
    tokens_per_view: list[int]

    @property
    def patches_per_view(self) -> np.ndarray:
        return self.spatial_shapes[:, 0] * self.spatial_shapes[:, 1]


class ImageProcessor:
    """NumPy port of the reference `Lfm2VlImageProcessor` (see the module docstring)."""

    def __init__(self, settings: ImageProcessorSettings | None = None, **overrides: Any):
        self.settings = (settings or ImageProcessorSettings()).replace(**overrides)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides: Any) -> ImageProcessor:
        """Settings from a checkpoint folder (`resolve_settings` has the rule), then `overrides`."""
        return cls(resolve_settings(folder), **overrides)

    def __call__(self, images: ImageInput | list[ImageInput], **overrides: Any) -> ImageBatch:
        """Preprocess one image or a list; `overrides` change any setting for this call only."""
        s = self.settings.replace(**overrides) if overrides else self.settings
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise Lfm2VlError("No images given. Pass at least one image.")

        loaded = []
        for source in images:
            rows = _load_rows(source, s.max_input_pixels)
            loaded.append((rows, plan_image(rows.height, rows.width, s)))

        p = s.encoder_patch_size
        shapes = [(h // p, w // p) for _, layout in loaded for h, w in layout.view_shapes]
        pixel_values = np.empty((sum(h * w for h, w in shapes), p * p * 3), np.float32)
        table = _value_table(s)
        tasks = []
        row = 0
        for planes, layout in loaded:
            for view in self._views(planes, layout, s.resample):
                height, width = view[0].shape
                count = (height // p) * (width // p)
                tasks.append((view, table, p, pixel_values[row : row + count]))
                row += count
        _run_chunks(_write_patches, tasks)
        return ImageBatch(
            pixel_values=pixel_values,
            spatial_shapes=np.asarray(shapes, np.int32).reshape(-1, 2),
            image_rows=[layout.rows for _, layout in loaded],
            image_cols=[layout.cols for _, layout in loaded],
            image_sizes=[layout.image_size for _, layout in loaded],
            views_per_image=[len(layout.view_shapes) for _, layout in loaded],
            tokens_per_view=[image_token_count(h, w, s.downsample_factor) for h, w in shapes],
        )

    preprocess = __call__

    @staticmethod
    def _views(
        planes: RgbRows, layout: ImageLayout, resample: int
    ) -> list[np.ndarray | list[np.ndarray]]:
        """Each view's (C, H, W) pixels (or C planes), in output order."""
        sizes = [layout.resized] + ([layout.thumbnail] if layout.thumbnail else [])
        resized, *thumbnail = _resize(planes, sizes, resample)
        if layout.rows * layout.cols == 1:
            return [resized, *thumbnail]
        resized = np.stack(resized) if isinstance(resized, list) else resized
        tile_h, tile_w = layout.resized[0] // layout.rows, layout.resized[1] // layout.cols
        views = [
            resized[:, r * tile_h : (r + 1) * tile_h, c * tile_w : (c + 1) * tile_w]
            for r in range(layout.rows)
            for c in range(layout.cols)
        ]
        return views + thumbnail

    def num_image_tokens(self, height: int, width: int, **overrides: Any) -> list[int]:
        """`<image>` tokens per view for an image of height x width, without any pixel work."""
        s = self.settings.replace(**overrides) if overrides else self.settings
        p = s.encoder_patch_size
        return [
            image_token_count(h // p, w // p, s.downsample_factor)
            for h, w in plan_image(height, width, s).view_shapes
        ]


__all__ = [
    "DEFAULT_MAX_INPUT_PIXELS",
    "ImageBatch",
    "ImageLayout",
    "ImageProcessor",
    "ImageProcessorSettings",
    "image_token_count",
    "is_image_too_large",
    "load_image",
    "plan_image",
    "resize",
    "resize_planes",
    "resolve_settings",
    "smart_resize",
    "tile_grid",
]
