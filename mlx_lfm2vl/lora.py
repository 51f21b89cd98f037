"""LoRA adapters on a loaded model, the way mlx-lm adds them; adapter folders.

`LoRALinear.from_base(layer)` wraps an `nn.Linear`, or an `nn.QuantizedLinear` (QLoRA: the base
stays quantized and frozen), and `apply_lora` swaps the wrapped layers in with
`model.update_modules`: the model files never learn that LoRA exists. A wrapped layer computes

    y = base(x) + scale * (x @ lora_a) @ lora_b        lora_a (in, rank), lora_b (rank, out)

with `lora_b` starting at zero, so an untrained adapter changes nothing.

An adapter folder (what `python -m mlx_lfm2vl.lora` writes, what `load(path, adapter_path=...)`
and `python -m mlx_lfm2vl.fuse` read) holds `adapter_config.json` (the kind of fine-tune; for
LoRA the rank, scale, dropout and the adapted layers' paths) and `adapters.safetensors` (the
trained weights: the LoRA matrices, or every trained weight of a full fine-tune).

`python -m mlx_lfm2vl.lora` is the trainer (`mlx_lfm2vl/train.py`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import Lfm2VlError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"

# The projections LoRA may adapt, by module name. The language model: attention (q, k, v, out),
# short conv (in, out) and feed-forward (w1, w2, w3). The vision side (`train_vision`): SigLIP2
# attention and MLP, and the projector's two layers.
LANGUAGE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3")
VISION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PROJECTOR_LAYERS = ("linear_1", "linear_2")


class LoRALinear(nn.Module):
    """A frozen linear layer (float or quantized) plus a trainable low-rank update."""

    @classmethod
    def from_base(
        cls,
        linear: nn.Linear | nn.QuantizedLinear,
        rank: int = 8,
        scale: float = 20.0,
        dropout: float = 0.0,
        key: mx.array | None = None,
    ) -> LoRALinear:
        return cls(linear, rank, scale, dropout, key)

    def __init__(
        self,
        linear: nn.Linear | nn.QuantizedLinear,
        rank: int,
        scale: float,
        dropout: float,
        key: mx.array | None = None,
    ):
        super().__init__()
        output_dims, input_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            input_dims = input_dims * 32 // linear.bits  # packed codes per uint32
        self.linear = linear
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        # mlx-lm's initialisation: lora_a uniform in +-1/sqrt(in), lora_b zero.
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (input_dims, rank), key=key)
        self.lora_b = mx.zeros((rank, output_dims))

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return y + (self.scale * z).astype(y.dtype)

    def delta(self) -> mx.array:
        """The update as a weight (out, in): scale * (lora_a @ lora_b).T."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def fuse(self, scales_dtype: mx.Dtype | None = None) -> nn.Linear | nn.QuantizedLinear:
        """The base layer with the update added to its weight: a float layer in its weight's
        dtype, or a quantized layer quantized again with its own settings, the codes chosen for
        scales stored in `scales_dtype` (default: those of the base)."""
        linear = self.linear
        if not isinstance(linear, nn.QuantizedLinear):
            fused = nn.Linear(*linear.weight.shape[::-1], bias="bias" in linear)
            fused.weight = (linear.weight + self.delta()).astype(linear.weight.dtype)
            if "bias" in linear:
                fused.bias = linear.bias
            return fused
        from .convert import _requantize_affine

        weight = mx.dequantize(
            linear.weight,
            linear.scales,
            linear.get("biases"),
            group_size=linear.group_size,
            bits=linear.bits,
            mode=linear.mode,
        )
        weight = weight.astype(mx.float32) + self.delta()
        dtype = scales_dtype or linear.scales.dtype
        out_dims, in_dims = weight.shape
        fused = nn.QuantizedLinear(
            in_dims,
            out_dims,
            bias="bias" in linear,
            group_size=linear.group_size,
            bits=linear.bits,
            mode=linear.mode,
        )
        params = {"group_size": linear.group_size, "bits": linear.bits, "mode": linear.mode}
        if linear.mode == "affine":
            fused.weight, fused.scales, fused.biases = _requantize_affine(weight, params, dtype)
        else:
            fused.weight, fused.scales = mx.quantize(
                weight, group_size=linear.group_size, bits=linear.bits, mode=linear.mode
            )
        if "bias" in linear:
            fused.bias = linear.bias
        return fused


def lora_targets(
    model: nn.Module, projections: list[str] | tuple[str, ...] | None = None, vision: bool = False
) -> list[str]:
    """Paths of the layers LoRA adapts: the language model's projections named in `projections`
    (default: all of `LANGUAGE_PROJECTIONS`), and with `vision` the vision tower's and the
    projector's too."""
    known = set(LANGUAGE_PROJECTIONS) | set(VISION_PROJECTIONS) | set(PROJECTOR_LAYERS)
    if projections is not None:
        unknown = sorted(set(projections) - known)
        if unknown or not projections:
            raise Lfm2VlError(
                f"unknown LoRA layer name(s) {', '.join(unknown) or '(none)'}: choose from "
                f"{', '.join(sorted(known))}"
            )
    names = set(projections) if projections is not None else known
    paths = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            continue
        parent, _, name = path.rpartition(".")
        if name not in names:
            continue
        language = parent.startswith("language_model.layers.") and name in LANGUAGE_PROJECTIONS
        tower = parent.startswith("vision_tower.encoder.layers.") and name in VISION_PROJECTIONS
        projector = parent == "multi_modal_projector" and name in PROJECTOR_LAYERS
        if language or (vision and (tower or projector)):
            paths.append(path)
    if not paths:
        raise Lfm2VlError(
            f"no layer of the model matches the LoRA layer names {', '.join(sorted(names))}"
        )
    return sorted(paths)


def apply_lora(
    model: nn.Module,
    paths: list[str],
    rank: int = 8,
    scale: float = 20.0,
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Wrap the layers at `paths` in `LoRALinear` (in place); `seed` fixes the initial lora_a."""
    if rank < 1:
        raise Lfm2VlError(f"LoRA rank {rank} must be at least 1")
    if not 0 <= dropout < 1:
        raise Lfm2VlError(f"LoRA dropout {dropout} must be in [0, 1)")
    modules = dict(model.named_modules())
    keys = mx.random.split(mx.random.key(seed), max(len(paths), 2))
    wrapped = []
    for i, path in enumerate(paths):
        layer = modules.get(path)
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            raise Lfm2VlError(
                f"the adapter names layer {path!r}, which this model does not have as a linear "
                "layer: were the adapters trained on another model?"
            )
        wrapped.append((path, LoRALinear.from_base(layer, rank, scale, dropout, key=keys[i])))
    model.update_modules(tree_unflatten(wrapped))
    return model


def fuse_lora(model: nn.Module, scales_dtype: mx.Dtype | None = None) -> nn.Module:
    """Replace every `LoRALinear` by its fused base layer (in place; `LoRALinear.fuse`)."""
    fused = [
        (path, m.fuse(scales_dtype))
        for path, m in model.named_modules()
        if isinstance(m, LoRALinear)
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def write_atomically(path: Path, write) -> None:
    """Write a file through `write(temporary_path)` and rename it into place, so a reader (or a
    run resumed after a crash) sees the old file or the new one, never half of one."""
    # The temporary name keeps the suffix: mx.save_safetensors appends one to a name without it.
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(path: Path, weights: dict[str, mx.array]) -> None:
    write_atomically(
        path, lambda tmp: mx.save_safetensors(tmp, weights, metadata={"format": "mlx"})
    )


def save_json(path: Path, value: Any) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2) + "\n"))


def trained_weights(model: nn.Module) -> dict[str, mx.array]:
    """What an adapter file holds: the model's trainable parameters."""
    return dict(tree_flatten(model.trainable_parameters()))


def read_adapter_config(adapter_path: str | Path) -> dict[str, Any]:
    folder = Path(adapter_path).expanduser()
    file = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise Lfm2VlError(
            f"adapter folder {folder} does not exist: pass the --adapter-path a training run wrote"
        )
    try:
        config = json.loads(file.read_text())
        if not isinstance(config, dict) or config.get("fine_tune_type") not in ("lora", "full"):
            raise ValueError
    except (OSError, ValueError):
        raise Lfm2VlError(
            f"{file} is missing or not an adapter config: pass the --adapter-path a training "
            "run wrote"
        ) from None
    return config


def load_adapters(model: nn.Module, adapter_path: str | Path) -> nn.Module:
    """Apply the adapters of `adapter_path` to a loaded model (in place): LoRA layers with their
    trained matrices, or the trained weights of a full fine-tune (in the model's compute dtype).
    Every tensor of the file must fit the model."""
    config = read_adapter_config(adapter_path)
    file = Path(adapter_path).expanduser() / ADAPTER_WEIGHTS
    try:
        weights = mx.load(str(file))
    except Exception as e:
        raise Lfm2VlError(
            f"cannot read {file} ({e}): pass the --adapter-path a training run wrote"
        ) from None
    if config["fine_tune_type"] == "lora":
        apply_lora(
            model, config["modules"], config["rank"], config["scale"], config.get("dropout", 0.0)
        )
        expected = {f"{p}.{n}" for p in config["modules"] for n in ("lora_a", "lora_b")}
    else:
        expected = set(weights)
        # A full fine-tune's weights take the place of the base's, in the compute dtype (the
        # base's own may have been kept bf16 for the CPU's forwarder).
        dtype = model.language_model.embedding_norm.weight.dtype
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    parameters = dict(tree_flatten(model.parameters()))
    if set(weights) != expected or not expected <= parameters.keys():
        names = sorted((set(weights) ^ expected) | (expected - parameters.keys()))
        raise Lfm2VlError(
            f"{file} does not fit this model or its adapter_config.json ({', '.join(names[:4])}"
            f"{' ...' if len(names) > 4 else ''}): were the adapters trained on another model?"
        )
    for name, value in weights.items():
        if value.shape != parameters[name].shape:
            raise Lfm2VlError(
                f"{name} in {file} has shape {tuple(value.shape)}, the model's is "
                f"{tuple(parameters[name].shape)}: were the adapters trained on another model?"
            )
    model.load_weights(list(weights.items()), strict=False)
    return model


if __name__ == "__main__":
    # `python -m mlx_lfm2vl.lora` trains; run the package's train module, not a copy of it.
    from mlx_lfm2vl.train import run

    run()
