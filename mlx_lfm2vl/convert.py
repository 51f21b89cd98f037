"""Convert a Hugging Face LFM2-VL checkpoint to an MLX folder: float (bf16/fp16/fp32) or quantized.

    python -m mlx_lfm2vl.convert --hf-path LiquidAI/LFM2-VL-450M --mlx-path lfm2-vl-450m-4bit -q

The output folder holds config.json (with a `quantization` section when quantized), safetensors
shards with this port's parameter names and MLX layouts (so loading converts nothing), and every
tokenizer, processor, chat-template and generation file of the source, so the folder alone runs.

Quantization is per component, by named recipe (`RECIPES`). The `quantization` section of
config.json follows mlx-lm's convention: top-level `group_size`/`bits`/`mode` are the defaults for
every layer that has saved `.scales`; a module path mapped to a dict overrides them for that
layer; a module path mapped to `false` stays in float. Every quantizable layer the recipe leaves in
float, or that cannot be quantized (input width not a multiple of any supported group size), is
listed as `false`, so the file says exactly which layers are what:

    "quantization": {"group_size": 64, "bits": 4, "mode": "affine", "recipe": "mixed-4",
                     "language_model.embed_tokens": {"group_size": 64, "bits": 8, "mode": "affine"},
                     "vision_tower.encoder.layers.0.mlp.fc2": false, ...}
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import MODEL_TYPES, ModelConfig
from .errors import Lfm2VlError
from .loading import _check_names, read_weights, resolve_model_path, sanitize
from .models.lfm2_vl import Lfm2VlModel

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}

# Bits per component; None keeps the component in the output float dtype. Components: the tied
# embedding / LM head ("embedding"), the LFM2 backbone's linear layers ("lm"), the SigLIP2 encoder's
# linear layers ("vision"), the projector MLP ("projector"). The numbers behind the choices are
# measured by tests/test_quantization_accuracy.py.
RECIPES: dict[str, dict[str, int | None]] = {
    "uniform-8": {"embedding": 8, "lm": 8, "vision": 8, "projector": 8},
    "uniform-4": {"embedding": 4, "lm": 4, "vision": 4, "projector": 4},
    # mlx-vlm's choice: the language side at 4 bits, the vision side left in float.
    "lm-4": {"embedding": 4, "lm": 4, "vision": None, "projector": None},
    # The body at 4 bits; the parts that lose most per byte saved at 8 bits (measured).
    "mixed-4": {"embedding": 8, "lm": 4, "vision": 8, "projector": 8},
}
# What `-q --q-bits N` means without --q-recipe.
DEFAULT_RECIPE = {4: "mixed-4", 8: "uniform-8"}
MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
GROUP_SIZES = (32, 64, 128)

# Quantizable layers that must stay float whatever the recipe: the vision position table is read
# as a matrix (resized to each view's grid by a matrix product), never looked up as an embedding;
# the patch embedding reads raw pixel patches, and at 0.6-0.9M parameters it is not worth
# quantizing.
_NEVER_QUANTIZED = (
    "vision_tower.embeddings.position_embedding",
    "vision_tower.embeddings.patch_embedding",
)

# Files of a checkpoint folder that are weights (rewritten, never copied) or rewritten here.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_REWRITTEN = ("config.json", "model.safetensors.index.json")
# Suffix of the hidden folder a conversion writes into, beside the output, before renaming it.
_PARTIAL = ".partial"

Progress = Callable[[str, int, int], None]
"""A progress callback: (stage, done, total), stage one of "load", "quantize", "write"."""


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    bytes_on_disk: int
    parameters: int  # parameters of the float model (quantized layers counted by their float size)
    seconds: float
    quantization: dict[str, Any] | None  # the config.json section, None for a float conversion

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_on_disk / self.parameters


def component(path: str) -> str | None:
    """The recipe component a quantizable module belongs to; None if it must stay float."""
    if path.startswith(_NEVER_QUANTIZED):
        return None
    if path in ("language_model.embed_tokens", "lm_head"):
        return "embedding"
    for prefix, name in (
        ("language_model.", "lm"),
        ("vision_tower.", "vision"),
        ("multi_modal_projector.", "projector"),
    ):
        if path.startswith(prefix):
            return name
    return None


def layer_params(bits: int, group_size: int, mode: str, in_features: int) -> dict[str, Any] | None:
    """The `to_quantized` arguments for one layer, or None if it cannot be quantized.

    Affine: the requested group size if it divides the layer's input width, else the largest
    smaller supported one that does (the fixtures' 96-wide vision layers get 32), else None (the
    1.6B/3B vision fc2, input 4304 = 16 * 269, divisible by no supported group size). The float
    formats have fixed group sizes; their "8-bit" level is mxfp8.
    """
    if mode == "affine":
        for size in sorted((g for g in GROUP_SIZES if g <= group_size), reverse=True):
            if in_features % size == 0:
                return {"group_size": size, "bits": bits, "mode": "affine"}
        return None
    mode = "mxfp8" if bits == 8 else mode
    size = 16 if mode == "nvfp4" else 32
    if in_features % size:
        return None
    return {"group_size": size, "bits": 8 if mode == "mxfp8" else 4, "mode": mode}


def recipe_bits(recipe: str) -> int:
    """The bits of a recipe's body (its lowest precision): 4 for mixed-4, 8 for uniform-8."""
    if recipe not in RECIPES:
        raise Lfm2VlError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return min(bits for bits in RECIPES[recipe].values() if bits is not None)


def quantization_plan(
    model: nn.Module,
    recipe: str = "mixed-4",
    group_size: int = 64,
    mode: str = "affine",
) -> dict[str, dict[str, Any] | bool]:
    """Every quantizable layer's path -> its `to_quantized` arguments, or False to stay float."""
    recipe_bits(recipe)  # validates the name
    if mode not in MODES:
        raise Lfm2VlError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "affine" and group_size not in GROUP_SIZES:
        raise Lfm2VlError(f"group size {group_size} is not one of {GROUP_SIZES}")
    plan: dict[str, dict[str, Any] | bool] = {}
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not hasattr(module, "to_quantized"):
            continue  # norms, the depthwise short conv: float by construction
        part = component(path)
        layer_bits = RECIPES[recipe][part] if part is not None else None
        params = None
        if layer_bits is not None:
            params = layer_params(layer_bits, group_size, mode, module.weight.shape[-1])
        plan[path] = params if params is not None else False
    return plan


def _requantize_affine(
    weight: mx.array, params: dict[str, Any], dtype: mx.Dtype
) -> tuple[mx.array, mx.array, mx.array]:
    """Affine quantization whose codes are chosen for the scales as stored in `dtype`.

    `mx.quantize` picks the codes for float32 scales; rounding those scales to bf16 afterwards
    adds up to one quantization step of error at the ends of a group's range (measured: 8-bit
    relative weight error 0.0054 -> 0.0068). Choosing the codes again against the rounded
    scales and biases recovers it (0.0054). Packing: `32 // bits` codes per uint32, first code in
    the lowest bits (the layout mx.quantize writes; pinned by a test).
    """
    group_size, bits = params["group_size"], params["bits"]
    weight = weight.astype(mx.float32)
    _, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    if 32 % bits:
        return mx.quantize(weight.astype(dtype), group_size=group_size, bits=bits)
    rows = weight.shape[0]
    groups = weight.reshape(rows, -1, group_size)
    codes = mx.round(
        (groups - biases.astype(mx.float32)[..., None]) / scales.astype(mx.float32)[..., None]
    )
    codes = mx.clip(codes, 0, 2**bits - 1).astype(mx.uint32).reshape(rows, -1, 32 // bits)
    shifts = mx.arange(32 // bits, dtype=mx.uint32) * bits
    packed = (codes << shifts).sum(axis=-1).astype(mx.uint32)
    return packed, scales, biases


def quantize_model(
    model: nn.Module,
    plan: dict[str, dict[str, Any] | bool],
    dtype: mx.Dtype = mx.bfloat16,
    progress: Progress | None = None,
) -> None:
    """Quantize `model` in place following `plan`; scales and biases are stored in `dtype`.

    Codes are computed from float32 copies of the weights, one layer at a time, so peak memory
    stays near the model's own size.
    """
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    todo = [(path, params) for path, params in plan.items() if params]
    quantized = []
    for done, (path, params) in enumerate(todo, start=1):
        module = modules[path]
        float_weight = module.weight.astype(mx.float32)
        layer = module.to_quantized(**params)
        if params["mode"] == "affine":
            layer.weight, layer.scales, layer.biases = _requantize_affine(
                float_weight, params, dtype
            )
        elif mx.issubdtype(layer.scales.dtype, mx.floating):
            layer.scales = layer.scales.astype(dtype)
        if "bias" in layer:
            layer.bias = layer.bias.astype(dtype)
        mx.eval(layer.parameters())
        quantized.append((path, layer))
        if progress is not None:
            progress("quantize", done, len(todo))
    model.update_modules(tree_unflatten(quantized))


def quantization_section(plan: dict[str, dict[str, Any] | bool], recipe: str) -> dict[str, Any]:
    """The config.json `quantization` section for a plan (format: see the module docstring)."""
    settings = [json.dumps(p, sort_keys=True) for p in plan.values() if p]
    if not settings:
        raise Lfm2VlError(f"recipe {recipe!r} quantizes no layer of this model")
    # The most common setting becomes the default; the others are written per layer.
    default = json.loads(max(set(settings), key=settings.count))
    section: dict[str, Any] = {**default, "recipe": recipe}
    for path, params in plan.items():
        if params != default:
            section[path] = params
    return section


def estimate_bytes(
    model: nn.Module, plan: dict[str, dict[str, Any] | bool], dtype: mx.Dtype
) -> int:
    """Bytes the converted weights take (without building them): for tables and size reports."""
    float_bytes = dtype.size
    total = 0
    for name, value in tree_flatten(model.parameters()):
        path, _, leaf = name.rpartition(".")
        params = plan.get(path)
        if params and leaf == "weight":
            bits, group = params["bits"], params["group_size"]
            # Affine: a scale and a bias per group in the float dtype; float formats: a 1-byte
            # scale per group and no bias.
            per_group = 2 * 8 * float_bytes if params["mode"] == "affine" else 8
            total += value.size * bits // 8 + value.size // group * per_group // 8
        else:
            total += value.size * float_bytes
    return total


def parameter_count(model: nn.Module) -> int:
    return sum(value.size for _, value in tree_flatten(model.parameters()))


def _source_files(folder: Path) -> list[Path]:
    """Tokenizer, processor, chat template, generation config, license...: all but weights."""
    return [
        f
        for f in sorted(folder.iterdir())
        if f.is_file()
        and not f.name.startswith(".")
        and f.name not in _REWRITTEN
        and not f.name.endswith(_WEIGHT_SUFFIXES)
    ]


def _write_shards(
    weights: dict[str, mx.array], folder: Path, max_shard_bytes: int, progress: Progress | None
) -> None:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        value = weights[name]
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        )
        mx.save_safetensors(str(folder / file_name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file_name))
        if progress is not None:
            progress("write", i, len(shards))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _set_dtype(raw: dict[str, Any], dtype_name: str) -> None:
    for section in (raw, raw.get("text_config") or {}, raw.get("vision_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in section:
                section[key] = dtype_name


def _safetensors_format(path: Path) -> str | None:
    """The `format` a safetensors file's header metadata names ("mlx", "pt", ...), if any."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if size <= 100 << 20 else None
    except (OSError, ValueError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata.get("format") if isinstance(metadata, dict) else None


def _is_converted_folder(folder: Path) -> bool:
    """Whether `folder` holds an LFM2-VL model in MLX layout: what this converter writes (and
    what earlier versions of it wrote), so the only kind of folder `force` may replace."""
    try:
        config = json.loads((folder / "config.json").read_text())
        shards = list(folder.glob("*.safetensors"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(config, dict)
        and config.get("model_type") in MODEL_TYPES
        and bool(shards)
        and all(_safetensors_format(shard) == "mlx" for shard in shards)
    )


def _output_folder(mlx_path: str | Path, force: bool) -> Path:
    """The absolute output folder, refused unless it is new, empty, or a converted model folder
    that `force` allows replacing: --force must never delete anything else (a working folder,
    a home folder, the source checkpoint...)."""
    if not str(mlx_path).strip():
        raise Lfm2VlError("the output path is empty: pass the folder to write, e.g. --mlx-path out")
    # abspath, not Path.absolute: "." and ".." become the folder they name.
    target = Path(os.path.abspath(Path(mlx_path).expanduser()))
    if not (target.exists() or target.is_symlink()):
        return target
    if not target.is_dir():
        raise Lfm2VlError(
            f"{target} exists and is not a folder; it is never replaced, even with --force: "
            "pick another --mlx-path"
        )
    try:
        empty = not any(target.iterdir())
    except OSError:
        empty = False
    if not empty and not _is_converted_folder(target):
        raise Lfm2VlError(
            f"{target} is not a model folder written by this converter (an LFM2-VL config.json "
            "with MLX safetensors); it is never replaced, even with --force: pick a new or "
            "empty folder"
        )
    if not force:
        raise Lfm2VlError(f"{target} already exists; pass --force to replace it")
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_partial(target: Path) -> tuple[Path, int]:
    """A new hidden folder beside `target` to write into, and the descriptor of the lock that
    marks it as in use (an exclusive flock on the folder itself, released when the descriptor
    is closed or the process dies, whatever kills it)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_PARTIAL, dir=target.parent))
    except OSError as e:
        raise Lfm2VlError(
            f"cannot create the output in {target.parent} ({e.strerror or e}): pick a "
            "writable --mlx-path"
        ) from None
    lock = os.open(tmp, os.O_RDONLY)
    # Where flock fails (some network file systems) it fails for the other runs too, which
    # then never take this folder for a stale one.
    with contextlib.suppress(OSError):
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # mkdtemp makes the folder private (0700); the model folder gets the modes of any new folder.
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp, lock


def _remove_stale_partials(target: Path) -> None:
    """Remove the partial folders of earlier conversions to `target` that no process holds."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[^.]+{re.escape(_PARTIAL)}")
    try:
        entries = [e for e in target.parent.iterdir() if pattern.fullmatch(e.name)]
    except OSError:
        return
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            continue
        try:
            lock = os.open(entry, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a running conversion writes there
        else:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(lock)


def _replace_folder(tmp: Path, target: Path) -> None:
    """Move a finished `tmp` into place; an existing `target` goes only once `tmp` is in place."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _write_model_folder(
    model: nn.Module,
    dtype: mx.Dtype,
    raw: dict,
    source: Path,
    tmp: Path,
    target: Path,
    max_shard_bytes: int,
    progress: Progress | None,
) -> None:
    """A model's weights (floats cast to `dtype`), its config and the source's tokenizer and
    processor files written into `tmp`, which then replaces `target`."""
    weights = {
        name: value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
        for name, value in tree_flatten(model.parameters())
    }
    _write_shards(weights, tmp, max_shard_bytes, progress)
    (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for file in _source_files(source):
        shutil.copy(file, tmp / file.name)
    _replace_folder(tmp, target)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    dtype: str = "bfloat16",
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int = 64,
    q_mode: str = "affine",
    q_recipe: str | None = None,
    force: bool = False,
    max_shard_bytes: int = 5 << 30,
    progress: Progress | None = None,
) -> ConversionResult:
    """Convert the checkpoint `hf_path` (folder or hub id) into the MLX folder `mlx_path`.

    The output is written to a hidden temporary folder beside `mlx_path` and renamed into place
    when complete, so an interrupted or failed conversion leaves nothing behind (and an existing
    folder replaced with `force` stays intact until then); such folders of killed conversions to
    the same output are removed by the next one. `force` replaces only an empty folder or one
    that holds an MLX-format LFM2-VL model; anything else is refused. Without `quantize`, `q_*`
    must be unset.
    `q_bits` selects the default recipe (`DEFAULT_RECIPE`); `q_recipe` names one explicitly.
    """
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise Lfm2VlError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out_dtype = DTYPES[dtype]
    recipe = None
    if quantize:
        recipe = q_recipe or DEFAULT_RECIPE.get(q_bits or 4)
        if recipe is None:
            raise Lfm2VlError(f"--q-bits {q_bits} is not offered; use 4 or 8")
        if q_recipe is not None and q_bits is not None and recipe_bits(q_recipe) != q_bits:
            raise Lfm2VlError(
                f"--q-recipe {q_recipe} is a {recipe_bits(q_recipe)}-bit recipe but --q-bits is "
                f"{q_bits}; drop one of the two"
            )
    elif q_recipe is not None or q_bits is not None:
        raise Lfm2VlError("--q-bits/--q-recipe quantize the model: add -q (--quantize)")

    target = _output_folder(mlx_path, force)
    source = resolve_model_path(hf_path)
    # Replacing (with --force) a folder that holds the source, or sits inside it, would delete
    # the weights being read.
    src, dst = source.resolve(), target.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise Lfm2VlError(f"the output {target} overlaps the source {source}: pick another folder")

    config = ModelConfig.from_file(source / "config.json")
    raw = copy.deepcopy(config.raw)
    if config.quantization is not None:
        raise Lfm2VlError(
            f"{source} is already quantized; convert from the original (float) checkpoint"
        )

    # The output's folder is created now, not after loading and quantizing the whole model:
    # a location that cannot be written fails at once. Partial folders left by killed runs
    # (SIGTERM without the CLI's handler, SIGKILL, power loss) are removed first.
    _remove_stale_partials(target)
    tmp, lock = _new_partial(target)
    try:
        if progress is not None:
            progress("load", 0, 1)
        model = Lfm2VlModel(config)
        weights = sanitize(read_weights(source), config)
        # Float weights go straight to the output dtype; quantized layers are recomputed from a
        # float32 copy of the source weights in quantize_model (exact for bf16/fp16 sources).
        _check_names(model, weights, source)  # a clear error for a config/weights mismatch
        model.load_weights(list(weights.items()), strict=True)
        params = parameter_count(model)
        if progress is not None:
            progress("load", 1, 1)

        section = None
        if recipe is not None:
            plan = quantization_plan(model, recipe, q_group_size, q_mode)
            section = quantization_section(plan, recipe)
            quantize_model(model, plan, out_dtype, progress)
            raw["quantization"] = section
        _set_dtype(raw, dtype)
        _write_model_folder(model, out_dtype, raw, source, tmp, target, max_shard_bytes, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    return ConversionResult(target, size, params, time.perf_counter() - start, section)


def _cli_progress(stage: str, done: int, total: int) -> None:
    if stage == "load":
        if done == 0:
            print("loading the checkpoint...", file=sys.stderr)
        return
    # On a terminal one line rewritten in place; in a log, only the completed stage.
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\r{stage}: {done}/{total}", end=end, file=sys.stderr, flush=True)
    elif done == total:
        print(f"{stage}: {done}/{total}", file=sys.stderr)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the CLI is, so the partial output is cleaned up on the
    way out (a BaseException: no `except Exception` on the way may swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _cleanup_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP end the conversion like Ctrl-C does, through its clean-up, instead
    of killing the process on the spot and leaving the partial output behind."""
    signals = (signal.SIGTERM, signal.SIGHUP)

    def terminate(signum: int, frame: Any) -> None:
        for sig in signals:  # a second signal must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        raise _Terminated(signum)

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers
        return
    previous = {sig: signal.signal(sig, terminate) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    """The command line (`python -m mlx_lfm2vl.convert`, top-level `convert.py`).

    Exits (SystemExit) with 0, 1 for a user error, 2 for a usage error, 130 on Ctrl-C and
    128 + the signal number on SIGTERM/SIGHUP; errors are one line on stderr.
    """
    import click

    from . import __version__

    @click.command(
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
    )
    @click.version_option(__version__, "--version", prog_name="mlx-lfm2vl")
    @click.option("--hf-path", required=True, help="Hub id or local folder of the checkpoint.")
    @click.option("--mlx-path", default="mlx_model", show_default=True, help="Output folder.")
    @click.option(
        "--dtype",
        type=click.Choice(list(DTYPES)),
        default="bfloat16",
        show_default=True,
        help="Dtype of float weights and of quantization scales.",
    )
    @click.option("-q", "--quantize", is_flag=True, help="Quantize (default recipe: mixed-4).")
    @click.option(
        "--q-bits",
        type=click.Choice(["4", "8"]),
        default=None,
        help="4: recipe mixed-4 (default); 8: recipe uniform-8.",
    )
    @click.option(
        "--q-group-size",
        type=click.Choice([str(g) for g in GROUP_SIZES]),
        default="64",
        show_default=True,
        help="Affine group size; layers it does not divide get a smaller one or stay float.",
    )
    @click.option(
        "--q-mode",
        type=click.Choice(MODES),
        default="affine",
        show_default=True,
        help="MLX's quantization format: affine (scale and bias per group of --q-group-size), or "
        "a float format with its own fixed group size; a recipe's 8-bit parts use mxfp8 then.",
    )
    @click.option(
        "--q-recipe",
        type=click.Choice(list(RECIPES)),
        default=None,
        help="Bits per model part: mixed-4 (LM 4, the rest 8), uniform-4, lm-4 (LM and "
        "embedding 4, vision and projector float), uniform-8.",
    )
    @click.option(
        "--force",
        is_flag=True,
        help="Replace an existing output folder that holds a converted model (or is empty); "
        "other folders and files are never replaced.",
    )
    def command(hf_path, mlx_path, dtype, quantize, q_bits, q_group_size, q_mode, q_recipe, force):
        """Convert a Hugging Face LFM2-VL checkpoint to an MLX model folder, float or quantized.

        The folder holds MLX-layout safetensors, config.json and the checkpoint's tokenizer and
        processor files: pass it to `python -m mlx_lfm2vl.generate --model`. It is written
        beside the output under a hidden name and renamed into place when complete.

        \b
        Examples:
          python -m mlx_lfm2vl.convert --hf-path LiquidAI/LFM2-VL-450M --mlx-path lfm2-vl-450m
          python -m mlx_lfm2vl.convert --hf-path LiquidAI/LFM2-VL-1.6B --mlx-path vl-1.6b-4bit -q
        """
        with _cleanup_on_termination():
            result = convert(
                hf_path,
                mlx_path,
                dtype=dtype,
                quantize=quantize,
                q_bits=int(q_bits) if q_bits else None,
                q_group_size=int(q_group_size),
                q_mode=q_mode,
                q_recipe=q_recipe,
                force=force,
                progress=_cli_progress,
            )
        what = f"recipe {result.quantization['recipe']}" if result.quantization else dtype
        click.echo(
            f"wrote {result.path} ({what}): {result.bytes_on_disk / 1e6:.1f} MB, "
            f"{result.bits_per_weight:.2f} bits/weight, {result.seconds:.1f} s"
        )

    # Worded and numbered like the generate CLI's exits.
    code = 0
    try:
        command.main(args=argv, prog_name="python -m mlx_lfm2vl.convert", standalone_mode=False)
    except Lfm2VlError as e:
        click.echo(f"error: {e}", err=True)
        code = 1
    except click.exceptions.Abort:  # Ctrl-C; the partial output was removed on the way out
        click.echo("aborted", err=True)
        code = 130
    except _Terminated as e:
        name = signal.Signals(e.signum).name
        click.echo(f"error: stopped by {name}; the partial output was removed", err=True)
        code = 128 + e.signum
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()} (see --help)", err=True)
        code = e.exit_code
    raise SystemExit(code)


if __name__ == "__main__":
    main()
