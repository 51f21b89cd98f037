"""Fine-tuning speed and memory: training tokens/s and peak memory per step.

    python benchmarks/bench_train.py --model FOLDER
    python benchmarks/bench_train.py --model M --modes lora,lora-checkpoint --steps 3

Each example is one conversation with a tiled image (by default 1024x768: 2x2 tiles of 256
tokens plus a thumbnail at the 450M settings) and a short answer, one example per step. Modes:
`lora` (the default LoRA on the language model), `lora-vision` (also the vision tower and the
projector), `full` (every language-model weight), each with `-checkpoint` for gradient
checkpointing (`--grad-checkpoint`). Every mode runs in its own process, so its peak memory is
its own: MLX's peak allocation over a step (weights, gradients, optimizer state, activations),
after a first warm-up step. Tokens are every input token of the step, image tokens included.

`--mlx-vlm PYTHON` also runs mlx-vlm's LoRA trainer (`python -m mlx_vlm.train`) on the same data
with that interpreter, with and without its gradient checkpointing, and reports the time,
tokens and peak memory it prints for its last step (its loss counts every token by default,
which costs it the LM head at every position). Run by hand on a quiet machine; never in the
test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

ANSWER = (
    "A photograph of a city street at night, with cars, people and bright shop windows. "
    "The cat sits on a mat; there are three red apples and one green pear on the table."
)


def write_data(folder: Path, width: int, height: int) -> Path:
    from reference import random_image

    random_image(height, width, seed=4).save(folder / "image.png")
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}],
            },
            {"role": "assistant", "content": ANSWER},
        ],
        "images": ["image.png"],
    }
    (folder / "train.jsonl").write_text(json.dumps(row) + "\n")
    return folder


def run_mode(model: str, data: Path, mode: str, steps: int) -> dict:
    """One mode in this process: a warm-up step, then `steps` measured steps."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_lfm2vl.loading import load_model
    from mlx_lfm2vl.processor import Processor
    from mlx_lfm2vl.train import (
        TrainOptions,
        encode,
        make_optimizer,
        prepare_for_training,
        read_dataset,
        train_step,
    )

    kind = mode.removesuffix("-checkpoint")
    options = TrainOptions(
        full=kind == "full",
        train_vision=kind == "lora-vision",
        grad_checkpoint=mode.endswith("-checkpoint"),
        learning_rate=1e-5,
    )
    processor = Processor.from_pretrained(model)
    net = load_model(model, dtype="float32", backend=False)
    prepare_for_training(net, options)
    optimizer = make_optimizer(options)
    example = read_dataset(data)[0][0]
    times, peaks = [], []
    for step in range(steps + 1):
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        result = train_step(net, optimizer, [encode(processor, example)])
        elapsed = time.perf_counter() - start
        if step:  # the first step allocates the optimizer state and warms up
            times.append(elapsed)
            peaks.append(mx.get_peak_memory() / 1e9)
    seconds = sorted(times)[len(times) // 2]
    return {
        "mode": mode,
        "tokens": result.tokens,
        "trained_tokens": result.trained_tokens,
        "seconds_per_step": seconds,
        "tokens_per_second": result.tokens / seconds,
        "peak_memory_gb": max(peaks),
        "trainable": sum(v.size for _, v in tree_flatten(net.trainable_parameters())),
    }


# Two patches make mlx-vlm 0.7.10's trainer run here, neither in the timed math: its streaming
# BPE detokenizer cannot index a tokenizer with gaps in its ids (the test checkpoints' tokenizer
# has them; training never detokenizes), so it gets its naive one, as in bench_vs_mlx_vlm.py;
# and its trainer stacks the image fields of a batch of one with a leading batch axis that its
# lfm2_vl model does not take ("too many values to unpack" in the position embeddings' resize),
# so that axis is dropped before the vision tower.
MLX_VLM_TRAIN = """
import runpy, sys
import mlx_vlm.tokenizer_utils
from mlx_vlm.models.lfm2_vl import lfm2_vl
mlx_vlm.tokenizer_utils._is_bpe_decoder = lambda decoder: False
original = lfm2_vl.Model.get_input_embeddings
def unbatched(self, input_ids=None, pixel_values=None, **kwargs):
    if pixel_values is not None and pixel_values.ndim == 4:
        pixel_values = pixel_values[0]
        for name in ("spatial_shapes", "pixel_attention_mask"):
            kwargs[name] = kwargs[name][0]
    return original(self, input_ids, pixel_values, **kwargs)
lfm2_vl.Model.get_input_embeddings = unbatched
sys.argv[0] = "mlx_vlm.train"
runpy.run_module("mlx_vlm.train", run_name="__main__", alter_sys=True)
"""


def run_mlx_vlm(python: str, model: str, data: Path, steps: int, checkpoint: bool) -> dict:
    """mlx-vlm's LoRA trainer (`python -m mlx_vlm.train`, its defaults: LoRA rank 8 on the
    language model, AdamW) on the same data; what it reports for its last step."""
    out = data / f"mlx_vlm_adapters_{int(checkpoint)}"
    command = [python, "-c", MLX_VLM_TRAIN, "--model", model, "--data", str(data)]
    command += ["--iters", str(steps + 1), "--batch-size", "1", "--steps-per-report", "1"]
    command += ["--steps-per-eval", "1000000", "--output-path", str(out)]
    command += ["--grad-checkpoint" if checkpoint else "--no-grad-checkpoint"]
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        return {"error": output.strip().splitlines()[-1]}
    values: dict[str, list[float]] = {}
    for name, value in re.findall(r"\b(\w+)=([0-9][0-9,.e+-]*)", output):
        values.setdefault(name, []).append(float(value.rstrip(",").replace(",", "")))
    return {
        "tokens": values["train_num_processed_tokens"][-1],
        "seconds_per_step": values["step_time"][-1],
        "peak_memory_gb": max(values["peak_memory"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an LFM2-VL checkpoint folder")
    parser.add_argument("--modes", default="lora,lora-checkpoint,full,full-checkpoint")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image", default="1024x768", help="WIDTHxHEIGHT of the image")
    parser.add_argument("--mlx-vlm", default=None, help="python of an environment with mlx-vlm")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_mode(args.model, Path(args.data), args.one, args.steps)))
        return

    width, height = map(int, args.image.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp), width, height)
        print(f"model {args.model}, one {width}x{height} image per example, float32\n")
        print("| mode | tokens/step | trained | s/step | tokens/s | peak memory GB |")
        print("|---|---|---|---|---|---|")
        for mode in args.modes.split(","):
            command = [sys.executable, __file__, "--model", args.model, "--one", mode]
            command += ["--data", str(data), "--steps", str(args.steps)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(f"| {mode} | failed: {result.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(result.stdout.strip().splitlines()[-1])
            print(
                f"| {mode} | {r['tokens']} | {r['trained_tokens']} | "
                f"{r['seconds_per_step']:.2f} | {r['tokens_per_second']:.0f} | "
                f"{r['peak_memory_gb']:.2f} |",
                flush=True,
            )
        if args.mlx_vlm:
            for checkpoint in (False, True):
                r = run_mlx_vlm(args.mlx_vlm, args.model, data, args.steps, checkpoint)
                mode = "mlx-vlm lora" + ("-checkpoint" if checkpoint else "")
                if "error" in r:
                    print(f"| {mode} | failed: {r['error']} |")
                    continue
                print(
                    f"| {mode} | {r['tokens']:.0f} | | {r['seconds_per_step']:.2f} | "
                    f"{r['tokens'] / r['seconds_per_step']:.0f} | {r['peak_memory_gb']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
