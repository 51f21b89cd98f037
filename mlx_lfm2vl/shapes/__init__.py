"""The shapes task and the small LFM2-VL trained on it here (docs/shapes.md)."""

from pathlib import Path

# Where the repository keeps the built model (`python -m mlx_lfm2vl.shapes.build` rewrites it).
MODEL = Path(__file__).resolve().parent / "model"
