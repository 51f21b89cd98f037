"""Image preprocessing time: this port (NumPy) against the reference `Lfm2VlImageProcessor`.

Run by hand (needs the `test` extra):

    python benchmarks/bench_preprocess.py [--runs 7] [--config path/to/preprocessor_config.json]

Two images, each given as a decoded PIL image (what apps pass) and as a JPEG file path (decoding
included): a 4032x3024 photo (tiled: 3x2 grid of 512x512 tiles + a thumbnail) and a 512x512 image
(one view, no resize). Port and reference run interleaved, so load on the machine hits both
alike; the table shows the median of `--runs` runs of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from mlx_lfm2vl.image_processor import ImageProcessor, ImageProcessorSettings

REFERENCE_CONFIG = (
    Path(__file__).resolve().parents[1]
    / "tests/data/reference/LFM2-VL-450M/preprocessor_config.json"
)


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus sensor-like noise: compresses and resamples like a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(xx / 97.0) * np.cos(yy / 71.0),
            128 + 90 * np.cos((xx + yy) / 153.0),
            (xx * 255.0 / width + yy * 120.0 / height) % 256,
        ],
        axis=-1,
    )
    noise = rng.normal(0.0, 6.0, base.shape).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--config", type=Path, default=REFERENCE_CONFIG)
    args = parser.parse_args()

    warnings.filterwarnings("ignore")  # the reference warns about torchvision image decoding
    from transformers.models.lfm2_vl.image_processing_lfm2_vl import Lfm2VlImageProcessor

    config = json.loads(args.config.read_text())
    reference = Lfm2VlImageProcessor(**config)
    port = ImageProcessor(ImageProcessorSettings.from_dict(config))

    tmp = Path(tempfile.mkdtemp())
    cases = []
    for name, (h, w) in {"4032x3024 photo": (3024, 4032), "512x512 image": (512, 512)}.items():
        pil = Image.fromarray(photo_like(h, w))
        path = tmp / f"{h}x{w}.jpg"
        pil.save(path, quality=90)
        cases.append((f"{name}, PIL.Image", pil))
        cases.append((f"{name}, JPEG file", str(path)))

    print("| input | port (ms) | reference (ms) | speed-up |\n|---|---:|---:|---:|")
    for name, image in cases:
        port(image), reference(image, return_tensors="np")  # warm caches and plans
        port_times, ref_times = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            port(image)
            port_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            reference(image, return_tensors="pt")
            ref_times.append(time.perf_counter() - t)
        p, r = median_ms(port_times), median_ms(ref_times)
        print(f"| {name} | {p:.1f} | {r:.1f} | {r / p:.2f}x |")


if __name__ == "__main__":
    main()
