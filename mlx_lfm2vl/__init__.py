"""mlx-lfm2vl: Liquid AI's LFM2-VL vision-language models on MLX.

    from mlx_lfm2vl import load, stream_generate
    model, processor = load("LiquidAI/LFM2-VL-450M")   # hub id or local folder
    for chunk in stream_generate(model, processor, "Describe this image.", images=["cat.jpg"]):
        print(chunk.text, end="", flush=True)

Importing this package imports neither torch nor transformers.
"""

from __future__ import annotations

import warnings
from importlib import metadata as _metadata
from pathlib import Path
from typing import TYPE_CHECKING

# `python -m mlx_lfm2vl.generate` (or `.batch`) imports this package first, which imports that
# module for the exports below; runpy then warns that the module it is about to run as __main__
# was already imported. Running it is safe (the CLIs keep no module state), so that one warning
# is silenced rather than dropping `from mlx_lfm2vl import generate`.
warnings.filterwarnings(
    "ignore",
    message="'mlx_lfm2vl\\.(generate|batch)' found in sys.modules",
    category=RuntimeWarning,
)

try:
    __version__ = _metadata.version("mlx-lfm2vl")
except _metadata.PackageNotFoundError:  # a source checkout used without installing it
    __version__ = "0.0.0+unknown"

from .batch import batch_generate  # noqa: E402
from .chat import Chat  # noqa: E402
from .errors import Lfm2VlError  # noqa: E402
from .generate import (  # noqa: E402
    GenerationChunk,
    GenerationResult,
    GenerationStats,
    generate,
    stream_generate,
)

if TYPE_CHECKING:
    import mlx.core as mx

    from .models.lfm2_vl import Lfm2VlModel
    from .processor import Processor

__all__ = [
    "Chat",
    "GenerationChunk",
    "GenerationResult",
    "GenerationStats",
    "Lfm2VlError",
    "__version__",
    "batch_generate",
    "generate",
    "load",
    "relaunch_with_fast_blas",
    "stream_generate",
]


def load(
    path_or_id: str | Path,
    dtype: str | mx.Dtype | None = None,
    adapter_path: str | Path | None = None,
) -> tuple[Lfm2VlModel, Processor]:
    """Load a model and its processor from a local folder or a Hugging Face hub id.

    The folder may hold a published checkpoint (HF layout) or one this project's converter wrote
    (quantized or not). `dtype` is the compute dtype of floating-point weights; by default float32
    on MLX's CPU backend (its only fast path) and the stored dtype on a GPU. `adapter_path` is a
    folder of fine-tuned adapters (`python -m mlx_lfm2vl.lora`), applied to the loaded weights.
    """
    from .loading import load_model, resolve_model_path
    from .processor import Processor

    folder = resolve_model_path(path_or_id)
    model = load_model(folder, dtype=dtype, adapter_path=adapter_path)
    return model, Processor.from_pretrained(folder)


def relaunch_with_fast_blas() -> None:
    """For scripts on Linux: restart this program once with OpenBLAS and the port's BLAS
    forwarder preloaded, which MLX's CPU backend needs to be fast (a preload must be in place
    before the process starts). Call it first thing in `if __name__ == "__main__":`; it replaces
    the process (same command, same options) and returns in the restarted one. Does nothing on
    macOS, when a system BLAS is already loaded, or with MLX_LFM2VL_BLAS_PRELOAD=0."""
    import sys

    if sys.platform == "linux":
        from .cpu.blas import relaunch_with_blas_preload

        relaunch_with_blas_preload()
