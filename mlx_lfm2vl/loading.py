"""Find a checkpoint, read its weights, build the model.

A checkpoint is a local folder or a Hugging Face hub id, in the published HF layout (safetensors,
sharded or not, bf16/fp16/fp32) or in the layout this project's converter writes (MLX parameter
names, optionally quantized, with a `quantization` section in config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .errors import Lfm2VlError
from .models.lfm2_vl import Lfm2VlModel

# What a hub download fetches: configs, weights, tokenizer and chat template; no PyTorch .bin files.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]


def resolve_model_path(path_or_id: str | Path) -> Path:
    """A local checkpoint folder, downloading (or reusing the cached copy of) a hub id if needed."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise Lfm2VlError(
            f"{name!r} is neither a checkpoint folder nor a hub id like 'LiquidAI/LFM2-VL-450M': "
            "pass the path of a folder that holds config.json and *.safetensors"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except HFValidationError as e:
        raise Lfm2VlError(f"{name!r} is not a valid hub id ({e}); pass a local folder") from None
    except Exception as e:  # offline, not found, gated, network errors: all mean "not available"
        reason = " ".join(str(e).split())  # hub errors span lines; ours is read as one
        if len(reason) > 160:
            reason = reason[:157].rsplit(" ", 1)[0] + " ..."  # whole words only
        raise Lfm2VlError(
            f"could not get {name!r} from the Hugging Face hub ({type(e).__name__}: {reason}). "
            "If you have the checkpoint on disk, pass its folder instead, e.g. "
            "--model /path/to/LFM2-VL-450M (a folder with config.json and *.safetensors)"
        ) from None


def read_weights(folder: Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint folder, checked against its shard index when there is one."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            shard_names = sorted(set(weight_map.values()))
            if not all(isinstance(name, str) for name in shard_names):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise Lfm2VlError(
                f"{index_file} is damaged or incomplete (it must map tensor names to shard files "
                "under weight_map); download or convert the checkpoint again"
            ) from None
        missing = [name for name in shard_names if not (folder / name).exists()]
        if missing:
            raise Lfm2VlError(
                f"{folder} is incomplete: shard(s) {', '.join(missing)} listed in "
                f"{index_file.name} are missing; download or convert the checkpoint again"
            )
        shards = [folder / name for name in shard_names]
    else:
        shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise Lfm2VlError(f"no *.safetensors in {folder}: is this a checkpoint folder?")
    weights: dict[str, mx.array] = {}
    for shard in shards:
        try:
            weights.update(mx.load(str(shard)))
        except Exception as e:
            raise Lfm2VlError(
                f"cannot read {shard} ({e}): the file is damaged or incomplete; download or "
                "convert the checkpoint again"
            ) from None
    return weights


def hf_to_mlx_name(name: str) -> str:
    """Map a checkpoint tensor name to this port's parameter name.

    Accepts the current layout (`model.language_model.*`, `model.vision_tower.*`,
    `model.multi_modal_projector.*`, `lm_head.*`), the one transformers 4.x saved, with
    `vision_tower.vision_model.*`, and the Aug-2025 remote-code layout (`language_model.model.*`,
    `language_model.lm_head.*`, `vision_tower.vision_model.*`). Converted MLX folders already use
    the port's names, which pass through unchanged.
    """
    name = name.removeprefix("model.")
    if name.startswith("language_model.lm_head."):
        return name.removeprefix("language_model.")
    if name.startswith("language_model.model."):
        name = "language_model." + name.removeprefix("language_model.model.")
    return name.replace("vision_tower.vision_model.", "vision_tower.", 1)


def sanitize(weights: dict[str, mx.array], config: ModelConfig) -> dict[str, mx.array]:
    """Checkpoint tensors -> this port's parameters (names and layouts)."""
    out = {}
    for name, value in weights.items():
        name = hf_to_mlx_name(name)
        if name.startswith("multi_modal_projector.layer_norm.") and not (
            config.projector_use_layernorm
        ):
            continue  # published repos ship these unused weights; the reference ignores them too
        if name == "lm_head.weight" and config.text.tie_word_embeddings:
            continue  # tied: the head is the embedding matrix
        if name.endswith("conv.conv.weight") and value.shape[1] == 1 and value.shape[2] > 1:
            value = value.transpose(0, 2, 1)  # torch depthwise (D, 1, K) -> MLX (D, K, 1)
        out[name] = value
    return out


def _check_names(model: nn.Module, weights: dict[str, mx.array], folder: Path) -> None:
    from mlx.utils import tree_flatten

    expected = {name for name, _ in tree_flatten(model.parameters())}
    missing = sorted(expected - weights.keys())
    unexpected = sorted(weights.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:8])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}")
        raise Lfm2VlError(
            f"the weights in {folder} do not match its config.json ({'; '.join(parts)}); "
            "is config.json from the same checkpoint?"
        )
    for name, parameter in tree_flatten(model.parameters()):
        if parameter.shape != weights[name].shape:
            raise Lfm2VlError(
                f"{name} in {folder} has shape {tuple(weights[name].shape)}, the config implies "
                f"{tuple(parameter.shape)}: is config.json from the same checkpoint?"
            )


def computes_on_cpu() -> bool:
    """Whether MLX computes on its CPU backend: the one device question the port asks. There the
    model gets the CPU backend (`mlx_lfm2vl.cpu`) and float32 by default."""
    return mx.default_device() == mx.cpu


def compute_dtype(requested: str | mx.Dtype | None, on_cpu: bool) -> mx.Dtype | None:
    """The dtype floating-point weights are cast to, or None to keep them as stored.

    MLX's CPU backend is fast only in float32 (bf16 and fp16 run on slow reference kernels there),
    so on the CPU the default is float32; on a GPU the stored dtype (bf16 for published weights).
    """
    if isinstance(requested, mx.Dtype):
        return requested
    if requested is None:
        return mx.float32 if on_cpu else None
    names = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
    if requested not in names:
        raise Lfm2VlError(f"dtype {requested!r} is not one of {', '.join(names)}")
    return names[requested]


def _layer_quantization(
    quantization: dict, path: str, module: nn.Module, weights: dict[str, mx.array]
) -> bool | dict:
    """How one layer is quantized: a per-layer entry of the `quantization` section (a dict of
    `to_quantized` arguments, or false for a float layer) wins; otherwise a layer is quantized
    with the section's defaults exactly when its scales were saved (mlx-lm's convention)."""
    if not hasattr(module, "to_quantized"):
        return False
    params = quantization.get(path)
    if isinstance(params, dict):
        return {k: params[k] for k in ("group_size", "bits", "mode") if k in params}
    if params is False:
        return False
    return f"{path}.scales" in weights


def load_model(
    path_or_id: str | Path,
    dtype: str | mx.Dtype | None = None,
    adapter_path: str | Path | None = None,
    backend: bool = True,
) -> Lfm2VlModel:
    """Build the model of a checkpoint folder or hub id and load its weights, then apply the
    adapters of `adapter_path` (`mlx_lfm2vl.lora.load_adapters`); on MLX's CPU backend, install
    the CPU backend on it (`mlx_lfm2vl.cpu.prepare`).

    `backend=False` builds the plain model of `mlx_lfm2vl/models/` on every device, with every
    weight in `dtype`: what training differentiates (the CPU backend's layers are for inference).
    """
    on_cpu = computes_on_cpu()
    install_cpu_backend = on_cpu and backend
    if install_cpu_backend:
        from . import cpu  # never imported on Metal
    folder = resolve_model_path(path_or_id)
    config = ModelConfig.from_file(folder / "config.json")
    model = Lfm2VlModel(config)
    weights = sanitize(read_weights(folder), config)
    if config.quantization is not None:
        quantization = config.quantization
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=lambda path, module: _layer_quantization(
                quantization, path, module, weights
            ),
        )
    _check_names(model, weights, folder)
    target = compute_dtype(dtype, on_cpu)
    if target is not None:
        # Scales and biases too: the quantized matmul computes in their dtype, and on the CPU
        # bf16 scales run ~10x slower than float32 ones.
        keep = cpu.kept_bf16_weights(model, target) if install_cpu_backend else set()
        weights = {
            name: value.astype(target)
            if mx.issubdtype(value.dtype, mx.floating)
            and not (name in keep and value.dtype == mx.bfloat16)
            else value
            for name, value in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
    weights.clear()  # the CPU backend's stacking must be able to free the unstacked weights
    if adapter_path is not None:
        from .lora import load_adapters

        load_adapters(model, adapter_path)
    model.eval()
    if install_cpu_backend:
        cpu.prepare(model)
    mx.eval(model.parameters())
    return model
