"""MLX's CPU backend: what makes the port fast there, installed on a loaded model.

`load()` calls `prepare(model)` when MLX computes on the CPU, and only then: on Metal nothing of
this package is imported, and the model is the plain MLX code of `mlx_lfm2vl/models/`.

- `layers`: the model's layers with CPU kernels in their seams (polynomial-exp activations and
  softmax, attention split over CPU streams, one-row matvecs, stacked projections, row blocks).
- `step`: one-token decode with each layer's own code compiled.
- `ops`: the kernels, in plain MLX.
- `blas`: Linux only: OpenBLAS behind a small forwarder (`native/gemv_forward.c`) that turns
  one-row products into gemv calls and multiplies bf16 weights in float32; the command lines
  preload it by relaunching themselves, `python -m mlx_lfm2vl.cpu` prints the preload line.

`prepare` works on a loaded model in place. Call it again after replacing weights (quantizing a
loaded model, loading adapters): layers whose weights changed run correctly until then, only
slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..models import lfm2, siglip2
from ..models.lfm2_vl import Lfm2VlModel
from . import ops
from .blas import bf16_product_tag, slow_blas_warning
from .layers import (
    CpuAttention,
    CpuEmbedding,
    CpuFeedForward,
    CpuLinear,
    CpuQuantizedEmbedding,
    CpuQuantizedLinear,
    CpuVisionAttention,
    CpuVisionMLP,
    swap_class,
)
from .step import CpuLfm2Model

# Large temporaries (attention scores, MLP activations: 16-64 MiB each) are freed and allocated
# again at every layer. glibc maps an allocation above its mmap threshold (at most 32 MiB) afresh
# each time, and the kernel page-faults it in (~0.6 ms per MiB). Raising the mmap threshold and
# the trim threshold keeps freed memory in the heap for the next allocation. Measured on a tiled
# 1024x768 image at the 450M shapes (vision tower, 6 runs each, 2026-12-05): MLX's own cache at
# its default 32 MiB 18.3-19.9 s, max RSS ~1700 MiB; MLX's cache raised to 512 MiB
# (`mx.set_cache_limit`) 17.4-20.1 s, ~2175 MiB; these thresholds 15.1-16.2 s, ~1715 MiB.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 256 << 20  # above any temporary of these models, below the largest weights
_TRIM_THRESHOLD = 512 << 20  # freed memory the process keeps before returning it


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (see above); True if it took effect. Linux with
    glibc only, and process-wide: set MLX_LFM2VL_KEEP_FREED_MEMORY=0 to leave malloc alone."""
    if sys.platform != "linux" or os.environ.get("MLX_LFM2VL_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = [(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)]
    return all([mallopt(option, value) for option, value in settings])


_EVERYWHERE = {
    lfm2.Attention: CpuAttention,
    lfm2.FeedForward: CpuFeedForward,
    lfm2.Lfm2Model: CpuLfm2Model,
    siglip2.Attention: CpuVisionAttention,
    siglip2.MLP: CpuVisionMLP,
}
# The language model's products (a decode step reads them one row at a time).
_LANGUAGE_MODEL = {
    nn.Linear: CpuLinear,
    nn.QuantizedLinear: CpuQuantizedLinear,
    nn.Embedding: CpuEmbedding,
    nn.QuantizedEmbedding: CpuQuantizedEmbedding,
}


def kept_bf16_weights(model: Lfm2VlModel, compute_dtype: mx.Dtype) -> set[str]:
    """The parameters that stay bf16 when stored so although the model computes in float32: the
    language model's matmul weights and its embedding table, which the forwarder multiplies in
    float32 as they are (`ops.bf16_matmul`). A decode step, bound by reading its weights, then
    reads half the bytes for the same products. Empty without the forwarder (or with
    MLX_LFM2VL_BF16_WEIGHTS=0)."""
    if compute_dtype != mx.float32 or bf16_product_tag() is None:
        return set()
    kept = {
        f"{path}.weight"
        for path, module in model.named_modules()
        if type(module) is nn.Linear and path.startswith(("language_model.", "lm_head"))
    }
    return kept | {"language_model.embed_tokens.weight"}


def prepare(model: Lfm2VlModel) -> Lfm2VlModel:
    """Install the CPU layers, stacks and compiled steps on a loaded model (in place)."""
    compute_dtype = model.language_model.embedding_norm.weight.dtype
    float32 = compute_dtype == mx.float32
    # Deepest first, so that a swapped parent takes its already swapped children along.
    for path, module in sorted(model.named_modules(), key=lambda item: -item[0].count(".")):
        swaps = dict(_EVERYWHERE)
        if path.startswith(("language_model.", "lm_head")):
            swaps.update(_LANGUAGE_MODEL)
        cls = swaps.get(type(module))
        if cls is None:
            continue
        swapped = swap_class(module, cls)
        if path:
            model.update_modules(tree_unflatten([(path, swapped)]))
    language_model = model.language_model
    if isinstance(language_model.embed_tokens, CpuEmbedding):
        language_model.embed_tokens.compute_dtype = compute_dtype
    for layer in language_model.layers:
        if layer.is_attention_layer:
            layer.self_attn.stack_projections()
        layer.feed_forward.stack_projections()
        if float32:  # the polynomial exp is float32 only
            layer.feed_forward.activation = ops.swiglu
    if float32:
        for layer in model.vision_tower.encoder.layers:
            if layer.mlp.activation is siglip2.gelu_tanh:
                layer.mlp.activation = ops.gelu_tanh
    language_model.compile_steps()
    mx.eval(model.parameters())

    keep_freed_memory()
    if float32 and (slow_blas := slow_blas_warning()) is not None:
        warnings.warn(slow_blas, RuntimeWarning, stacklevel=3)
    return model
