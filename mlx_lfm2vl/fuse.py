"""Merge trained adapters into a new model folder.

    python -m mlx_lfm2vl.fuse --model M --adapter-path adapters --save-path fused

The new folder is a model like one the converter writes (MLX-layout safetensors, config.json,
the tokenizer and processor files of the base) and loads without the adapters. LoRA updates are
added to their layers' weights (`LoRALinear.fuse`: a quantized layer is quantized again with its
own settings, the codes chosen for the stored scales as the converter chooses them); a full
fine-tune's weights replace the base's. It is written as the converter writes: into a hidden
folder beside the target, renamed into place when complete; an existing target is replaced only
with `force`, and only if it is empty or holds a converted model.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .config import ModelConfig
from .convert import (
    DTYPES,
    _new_partial,
    _output_folder,
    _remove_stale_partials,
    _set_dtype,
    _write_model_folder,
)
from .errors import Lfm2VlError
from .loading import load_model, resolve_model_path
from .lora import fuse_lora, read_adapter_config

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True)
class FuseResult:
    path: Path
    fine_tune_type: str  # "lora" or "full"
    dtype: str
    bytes_on_disk: int
    seconds: float


def stored_dtype(folder: Path) -> str:
    """The dtype most of a checkpoint's float tensors are stored in (read from the headers)."""
    counts: Counter[str] = Counter()
    for shard in sorted(folder.glob("*.safetensors")):
        try:
            with open(shard, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except (OSError, ValueError):
            continue
        for name, entry in header.items():
            if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                counts[_SAFETENSORS_DTYPES[entry["dtype"]]] += 1
    return counts.most_common(1)[0][0] if counts else "float32"


def fuse(
    model: str | Path,
    adapter_path: str | Path,
    save_path: str | Path,
    dtype: str | None = None,
    force: bool = False,
    max_shard_bytes: int = 5 << 30,
) -> FuseResult:
    """Write the model `model` with the adapters of `adapter_path` merged into `save_path`.

    `dtype` is the dtype of the written float weights (and quantization scales); by default the
    one the base stores. The merge itself is computed in float32.
    """
    start = time.perf_counter()
    if dtype is not None and dtype not in DTYPES:
        raise Lfm2VlError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config = read_adapter_config(adapter_path)
    target = _output_folder(save_path, force)
    source = resolve_model_path(model)
    dst = target.resolve()
    for other, what in ((source, "model"), (Path(adapter_path).expanduser(), "adapter folder")):
        src = other.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            raise Lfm2VlError(f"--save-path {target} overlaps the {what} {other}: pick another")
    out_name = dtype or stored_dtype(source)
    out_dtype = DTYPES[out_name]
    raw = copy.deepcopy(ModelConfig.from_file(source / "config.json").raw)

    _remove_stale_partials(target)
    tmp, lock = _new_partial(target)
    try:
        net = load_model(source, dtype=mx.float32, adapter_path=adapter_path, backend=False)
        fuse_lora(net, scales_dtype=out_dtype)
        _set_dtype(raw, out_name)
        _write_model_folder(net, out_dtype, raw, source, tmp, target, max_shard_bytes, None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    return FuseResult(target, config["fine_tune_type"], out_name, size, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code. User errors print one line on stderr."""
    import click

    from .cli_options import command as click_command
    from .cli_options import run_command

    @click_command()
    @click.option("--model", required=True, help="The base model the adapters were trained on.")
    @click.option(
        "--adapter-path",
        default="adapters",
        show_default=True,
        help="Folder of the trained adapters (python -m mlx_lfm2vl.lora --adapter-path).",
    )
    @click.option("--save-path", default="fused_model", show_default=True, help="Output folder.")
    @click.option(
        "--dtype",
        type=click.Choice(list(DTYPES)),
        default=None,
        help="Dtype of the written float weights. Default: the base model's.",
    )
    @click.option(
        "--force",
        is_flag=True,
        help="Replace an existing output folder that holds a converted model (or is empty).",
    )
    def command(model, adapter_path, save_path, dtype, force):
        """Merge fine-tuned adapters into a new model folder that loads without them.

        \b
        Example:
          python -m mlx_lfm2vl.fuse --model LiquidAI/LFM2-VL-450M --adapter-path adapters \\
              --save-path lfm2-vl-450m-tuned
        """
        result = fuse(model, adapter_path, save_path, dtype=dtype, force=force)
        click.echo(
            f"wrote {result.path} ({result.fine_tune_type} adapters merged, {result.dtype}): "
            f"{result.bytes_on_disk / 1e6:.1f} MB, {result.seconds:.1f} s"
        )

    return run_command(command, argv, "python -m mlx_lfm2vl.fuse", interrupted="aborted")


def run() -> None:
    """The program (`python -m mlx_lfm2vl.fuse`, the `mlx-lfm2vl-fuse` script)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
