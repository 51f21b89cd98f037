"""Speed and memory of this port against mlx-vlm's `lfm2_vl`, stage by stage, in one run.

Run by hand, never part of the test suite. Setup (once):

    # Debian's OpenBLAS: the BLAS bundled in the mlx[cpu] wheel is the slow reference one
    apt-get install libopenblas0-pthread
    python3 -m venv ../bench-venv
    ../bench-venv/bin/pip install mlx-vlm "mlx[cpu]" -e .   # the peer and this port
    # a second environment with torch + transformers (the project's `test` extra) builds the
    # random-weight checkpoints and runs the transformers column; the project's .venv is one

Run (the same BLAS for every contender; the script records which one MLX loaded). The preload
the port's README gives: OpenBLAS behind the port's gemv forwarder (`mlx_lfm2vl/cpu/blas.py`),
which both contenders then use, since they share the process:

    LD_PRELOAD="$(../bench-venv/bin/python -m mlx_lfm2vl.cpu)" \
        ../bench-venv/bin/python benchmarks/bench_vs_mlx_vlm.py \
        --torch-python .venv/bin/python \
        [--model lfm2-vl-450m-real] [--runs 3] [--tokens 128] [--out results.md]

With `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0` instead, both run on plain OpenBLAS.

Random-weight checkpoints at the real shapes (`tests/checkpoints.py`, stored in bf16 as
published) are built once with `--torch-python` and cached in `--cache`
(~/.cache/mlx_lfm2vl/bench by default). mlx-vlm loads the same HF-layout folder (its
`sanitize` maps the names); it keeps the
stored bf16, so for the float32 columns the benchmark casts its weights with
`model.set_dtype(mx.float32)` right after `load()` (inside the timed load). This port's `load()`
computes in float32 on the CPU by default; with the forwarder preloaded it keeps the language
model's stored bf16 matmul weights and multiplies them in float32 as they are (the same
products, half the bytes read per token), unless `--port-f32-weights` casts them like mlx-vlm's.
The table header says which.

Stages, each port and mlx-vlm interleaved A B A B after one warm-up of each: image preprocessing
(processor call: chat template, resize/tile, patchify, tokenize), vision tower + projector, time to
first token (vision + merge + prefill + first sample, from preprocessed inputs), decode tokens/s
over `--tokens` tokens (greedy, EOS ignored: both libraries' `generate_step`, which does not stop
at EOS).
Decode against the bandwidth limit: tokens/s x LM weight bytes read per token / the NumPy copy
rate (read + write) measured right before that run. Prefill tokens/s is derived: prompt tokens /
(TTFT median - vision median). Import time, cold
`load()` time and peak memory (one tiled-image request) run in fresh processes. The fixture's
tokenizer has gaps in its ids, which mlx-vlm's BPE streaming detokenizer cannot index; the benchmark
makes mlx-vlm pick its naive detokenizer (not used by the timed paths).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = {"256x384": (256, 384), "512x512": (512, 512), "1024x768 tiled": (1024, 768)}  # W x H
PROMPT = "Describe this image."
REAL_SHAPES = {
    "lfm2-vl-450m-real": "LFM2-VL-450M",
    "lfm2-vl-1.6b-real": "LFM2-VL-1.6B",
}


# ---------------------------------------------------------------- checkpoints (torch environment)


def build(name: str, cache: Path) -> Path:
    """The random-weight checkpoint `name` in HF layout under `cache` (built once, with torch)."""
    folder = cache / name
    if (folder / "config.json").exists():
        return folder
    sys.path.insert(0, str(REPO))
    from tests import checkpoints

    checkpoints.FIXTURES_AT_REAL_SHAPES.setdefault(
        name, {"source": REAL_SHAPES[name], "text": {}, "vision": {}, "top": {}}
    )
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints.build_checkpoint(name, folder, dtype="bfloat16")
    return folder


def quantized_folders(folder: Path, bits: int) -> dict[str, Path]:
    """Each contender's own `bits`-bit conversion of `folder`, made with its own converter."""
    port = folder.with_name(f"{folder.name}-port-q{bits}")
    peer = folder.with_name(f"{folder.name}-mlx-vlm-q{bits}")
    commands = {
        port: ["-m", "mlx_lfm2vl.convert", "--q-recipe", f"uniform-{bits}", "--dtype", "float32"],
        peer: ["-m", "mlx_vlm", "convert", "--q-bits", str(bits), "--dtype", "float32"],
    }
    for out, command in commands.items():
        if not (out / "config.json").exists():
            common = ["--hf-path", str(folder), "--mlx-path", str(out), "-q", "--q-group-size"]
            subprocess.run([sys.executable, *command, *common, "64"], check=True)
    return {"port": port, "mlx-vlm": peer}


def image(size: tuple[int, int]):
    import numpy as np
    from PIL import Image

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(xx / 37), 128 + 90 * np.cos((xx + yy) / 53), xx % 256], -1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------- the two contenders


class Port:
    name = "port"

    def load(self, folder: Path, dtype: str | None):
        import mlx.core as mx

        from mlx_lfm2vl import load

        self.model, self.processor = load(folder, dtype=dtype)
        mx.eval(self.model.parameters())

    def preprocess(self, img):
        return self.processor(PROMPT, images=[img] if img is not None else None)

    def vision(self, inputs):
        import mlx.core as mx

        mx.eval(self.model.get_image_features(inputs["pixel_values"], inputs["spatial_shapes"]))

    def generate(self, inputs, n: int):
        """Yields n greedy tokens (the first after prefill)."""
        import mlx.core as mx

        from mlx_lfm2vl.generate import generate_step, prefill

        cache = self.model.make_cache()
        logits = prefill(
            self.model,
            inputs["input_ids"],
            inputs.get("pixel_values"),
            inputs.get("spatial_shapes"),
            cache=cache,
        )
        sampler = lambda logits, key: mx.argmax(logits, axis=-1)  # noqa: E731
        yield from generate_step(self.model, logits, cache, sampler=sampler, max_tokens=n)

    def lm_weight_bytes(self) -> int:
        from mlx.utils import tree_flatten

        lm = tree_flatten(self.model.language_model.parameters())
        head = tree_flatten(self.model.lm_head.parameters()) if "lm_head" in self.model else []
        return sum(v.nbytes for _, v in lm + head)


class MlxVlm:
    name = "mlx-vlm"

    def lm_weight_bytes(self) -> int:
        from mlx.utils import tree_flatten

        return sum(v.nbytes for _, v in tree_flatten(self.model.language_model.parameters()))

    def load(self, folder: Path, dtype: str | None):
        import mlx.core as mx
        import mlx_vlm.tokenizer_utils
        from mlx_vlm import load

        mlx_vlm.tokenizer_utils._is_bpe_decoder = lambda decoder: False  # see module docstring
        self.model, self.processor = load(str(folder))
        if dtype is not None:
            self.model.set_dtype(getattr(mx, dtype))
        mx.eval(self.model.parameters())
        from mlx_vlm import apply_chat_template

        self.prompts = {
            n: apply_chat_template(self.processor, self.model.config, PROMPT, num_images=n)
            for n in (0, 1)
        }

    def preprocess(self, img):
        from mlx_vlm import prepare_inputs

        return prepare_inputs(
            self.processor,
            images=[img] if img is not None else None,
            prompts=self.prompts[int(img is not None)],
            image_token_index=self.model.config.image_token_index,
        )

    def vision(self, inputs):
        import mlx.core as mx

        features = self.model.encode_images(
            inputs["pixel_values"],
            spatial_shapes=inputs["spatial_shapes"],
            pixel_attention_mask=inputs["pixel_attention_mask"],
        )
        mx.eval(mx.concatenate(features, axis=0))

    def generate(self, inputs, n: int):
        from mlx_vlm.generate.ar import generate_step

        extra = {k: inputs[k] for k in ("spatial_shapes", "pixel_attention_mask") if k in inputs}
        yield from generate_step(
            inputs["input_ids"],
            self.model,
            inputs.get("pixel_values"),
            None,
            max_tokens=n,
            temperature=0.0,
            **extra,
        )


CONTENDERS = {"port": Port, "mlx-vlm": MlxVlm}


# ---------------------------------------------------------------- measurements


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def request(contender, inputs, n: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s over the n - 1 tokens after the first)."""
    start = time.perf_counter()
    steps = contender.generate(inputs, n)
    next(steps)
    first = time.perf_counter()
    count = sum(1 for _ in steps)
    end = time.perf_counter()
    return first - start, count / (end - first) if count else float("nan")


def interleaved(contenders, runs: int, fn) -> dict[str, list[float]]:
    """fn(contender) once each as warm-up, then `runs` rounds A B A B."""
    for c in contenders:
        fn(c)
    results: dict[str, list[float]] = {c.name: [] for c in contenders}
    for _ in range(runs):
        for c in contenders:
            results[c.name].append(fn(c))
    return results


def copy_bandwidth() -> dict[str, float]:
    """Bytes/s of a 256 MB float32 copy (read + write), best of 5: MLX and NumPy."""
    import mlx.core as mx
    import numpy as np

    n = 64 * 1024 * 1024
    a = mx.zeros((n,), mx.float32) + 1
    mx.eval(a)
    best = min(timed(lambda: mx.eval(a * 1)) for _ in range(5))
    an, bn = np.ones(n, np.float32), np.empty(n, np.float32)
    best_np = min(timed(lambda: np.copyto(bn, an)) for _ in range(5))
    return {"mlx": 2 * a.nbytes / best, "numpy": 2 * an.nbytes / best_np}


_COPY_BUFFERS: list = []


def copy_rate_now() -> float:
    """Bytes/s of a 256 MB NumPy float32 copy (read + write), best of 3, taken right before a
    decode run: the machine's bandwidth drifts (18-37 GB/s seen in one session on a shared
    host), so each run is set against the bandwidth of its own moment."""
    import numpy as np

    if not _COPY_BUFFERS:
        n = 64 * 1024 * 1024
        _COPY_BUFFERS.extend([np.ones(n, np.float32), np.empty(n, np.float32)])
    source, target = _COPY_BUFFERS
    return 2 * source.nbytes / min(timed(lambda: np.copyto(target, source)) for _ in range(3))


def blas_in_use() -> str:
    """The BLAS MLX calls in this process, as the port's `--verbose` names it."""
    try:
        from mlx_lfm2vl.cpu.blas import blas_in_use as port_blas_in_use
    except ImportError:  # a checkout from before mlx_lfm2vl/cpu/ (runs comparing versions)
        from mlx_lfm2vl.cpu_backend import blas_in_use as port_blas_in_use
    return port_blas_in_use()


# ---------------------------------------------------------------- fresh-process measurements


def worker(kind: str, contender: str, folder: Path, dtype: str | None, tokens: int) -> dict:
    """Runs in a fresh process: import time, cold load() time, or one request's peak memory."""
    start = time.perf_counter()
    if kind == "import":
        __import__("mlx_lfm2vl" if contender == "port" else "mlx_vlm")
        return {
            "seconds": time.perf_counter() - start,
            "torch": "torch" in sys.modules,
            "transformers": "transformers" in sys.modules,
        }
    c = CONTENDERS[contender]()
    import mlx.core as mx

    if contender == "mlx-vlm":
        import mlx_vlm  # noqa: F401  (import is not part of load)
    else:
        import mlx_lfm2vl  # noqa: F401
    if kind == "load":
        return {"seconds": timed(lambda: c.load(folder, dtype))}
    c.load(folder, dtype)
    mx.reset_peak_memory()
    inputs = c.preprocess(image(IMAGES["1024x768 tiled"]))
    for _ in c.generate(inputs, tokens):
        pass
    return {"peak_mlx": mx.get_peak_memory(), "max_rss": peak_rss()}


def peak_rss() -> int:
    """This process's peak resident set, in bytes.

    On Linux, getrusage's ru_maxrss also counts the process it was forked from (the kernel
    carries the high-water mark across exec), so a worker started by the benchmark, which holds
    both models, would report the benchmark's own peak; /proc's VmHWM is this program's alone.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def in_fresh_process(kind: str, contender: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, contender, "--model", args.model]
    cmd += ["--cache", str(args.cache), "--dtype", args.dtype, "--tokens", str(args.tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- transformers reference (torch)


def torch_reference(folder: Path, tokens: int, runs: int) -> dict:
    """Vision + projector per image, TTFT and decode tokens/s: transformers, torch CPU, float32."""
    import torch
    from transformers import AutoProcessor, Lfm2VlForConditionalGeneration

    torch.set_grad_enabled(False)
    model = Lfm2VlForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    out: dict = {"threads": torch.get_num_threads()}
    for label, size in IMAGES.items():
        inputs = processor(text=text, images=[image(size)], return_tensors="pt")

        def vision(inputs=inputs):
            model.model.get_image_features(
                inputs["pixel_values"], inputs["spatial_shapes"], inputs["pixel_attention_mask"]
            )

        vision()
        out[f"vision {label}"] = [timed(vision) for _ in range(runs)]
    inputs = processor(text=text, images=[image(IMAGES["256x384"])], return_tensors="pt")

    def generate(n):
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    generate(2)
    first = [timed(lambda: generate(1)) for _ in range(runs)]
    full = [timed(lambda: generate(tokens + 1)) for _ in range(runs)]
    out["ttft 256x384"] = first
    out["decode"] = [tokens / (f - statistics.median(first)) for f in full]
    return out


# ---------------------------------------------------------------- report


def fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    med = statistics.median(values) * scale
    spread = (max(values) - min(values)) * scale / 2
    return f"{med:.{digits}f} ± {spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lfm2-vl-450m-real", choices=sorted(REAL_SHAPES))
    cache = Path.home() / ".cache" / "mlx_lfm2vl" / "bench"
    parser.add_argument("--cache", type=Path, default=cache)
    parser.add_argument("--dtype", default="float32", help="compute dtype of both contenders")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--torch-python", help="python of an environment with torch+transformers")
    parser.add_argument(
        "--stages",
        default="all",
        choices=["all", "vision", "decode"],
        help="all; vision (preprocessing, vision tower); decode (text-only prompt)",
    )
    parser.add_argument(
        "--quantize",
        type=int,
        choices=[4, 8],
        help="run each contender on its own quantized conversion (affine, group 64, every layer "
        "its converter quantizes by default; this port: recipe uniform-N), made once in --cache",
    )
    parser.add_argument(
        "--port-f32-weights",
        action="store_true",
        help="cast the port's LM weights to float32 too (MLX_LFM2VL_BF16_WEIGHTS=0); by default "
        "a float32 run keeps the stored bf16 matmul weights and multiplies them in float32",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "CONTENDER"), help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.cache / args.model
    dtype = None if args.dtype == "stored" else args.dtype
    if args.port_f32_weights:
        os.environ["MLX_LFM2VL_BF16_WEIGHTS"] = "0"  # read at the port's first load; inherited

    if args.build:
        print(build(args.model, args.cache))
        return
    if args.reference:
        print(json.dumps(torch_reference(folder, args.tokens, args.runs)))
        return
    if args.worker:
        print(json.dumps(worker(*args.worker, folder, dtype, args.tokens + 1)))
        return

    if not (folder / "config.json").exists():
        if not args.torch_python:
            sys.exit(f"{folder} is missing: pass --torch-python to build it")
        run = [args.torch_python, __file__, "--build", "--model", args.model]
        subprocess.run(run + ["--cache", str(args.cache)], check=True)

    import mlx.core as mx

    folders = {"port": folder, "mlx-vlm": folder}
    if args.quantize:
        folders = quantized_folders(folder, args.quantize)
    load_avg_start = os.getloadavg()
    contenders = [Port(), MlxVlm()]
    for c in contenders:
        c.load(folders[c.name], dtype)
    weight_bytes = {c.name: c.lm_weight_bytes() for c in contenders}
    port_weights = str(contenders[0].model.language_model.embed_tokens.weight.dtype).split(".")[-1]
    print("LM weight bytes", weight_bytes, file=sys.stderr)
    rows: list[tuple[str, dict[str, str], str]] = []  # (stage, value per contender, unit)
    raw: dict[str, dict[str, list[float]]] = {}

    def stage(label: str, unit: str, fn, scale: float = 1.0, higher_is_better=False):
        result = interleaved(contenders, args.runs, fn)
        raw[label] = result
        rows.append((label, {k: fmt(v, scale) for k, v in result.items()}, unit))
        print(label, {k: fmt(v, scale) for k, v in result.items()}, file=sys.stderr, flush=True)

    images = {label: image(size) for label, size in IMAGES.items()}
    prepared = {c.name: {k: c.preprocess(v) for k, v in images.items()} for c in contenders}
    prompt_tokens = {k: prepared["port"][k]["input_ids"].shape[1] for k in images}
    if args.stages in ("all", "vision"):
        for label in ("256x384", "1024x768 tiled"):
            stage(
                f"preprocess {label}",
                "ms",
                lambda c, label=label: timed(lambda: c.preprocess(images[label])),
                1000,
            )
        for label in images:
            stage(
                f"vision + projector {label}",
                "s",
                lambda c, label=label: timed(lambda: c.vision(prepared[c.name][label])),
            )
    if args.stages == "all":
        for label in ("256x384", "1024x768 tiled"):
            n = args.tokens + 1 if label == "256x384" else 1
            ttft: dict[str, list[float]] = {c.name: [] for c in contenders}
            decode: dict[str, list[float]] = {c.name: [] for c in contenders}
            rates: dict[str, list[float]] = {c.name: [] for c in contenders}

            def one(c, label=label, n=n, ttft=ttft, decode=decode, rates=rates):
                rates[c.name].append(copy_rate_now())
                t, d = request(c, prepared[c.name][label], n)
                ttft[c.name].append(t)
                decode[c.name].append(d)
                return t

            interleaved(contenders, args.runs, one)
            for v in list(ttft.values()) + list(decode.values()) + list(rates.values()):
                del v[0]  # warm-up
            raw[f"ttft {label}"] = ttft
            rows.append(
                (
                    f"time to first token {label} ({prompt_tokens[label]} tok)",
                    {k: fmt(v) for k, v in ttft.items()},
                    "s",
                )
            )
            vision = raw[f"vision + projector {label}"]
            prefill = {
                k: [prompt_tokens[label] / (t - statistics.median(vision[k])) for t in ttft[k]]
                for k in ttft
            }
            raw[f"prefill {label}"] = prefill
            rows.append(
                (
                    f"prefill {label} (derived)",
                    {k: fmt(v, digits=1) for k, v in prefill.items()},
                    "tok/s",
                )
            )
            if label == "256x384":
                raw["decode"], raw["copy rate"] = decode, rates
                rows.append(
                    (
                        f"decode ({args.tokens} tok, image prompt)",
                        {k: fmt(v) for k, v in decode.items()},
                        "tok/s",
                    )
                )
            print(rows[-2:], file=sys.stderr, flush=True)
    if args.stages == "decode":
        text_inputs = {c.name: c.preprocess(None) for c in contenders}
        rates = {c.name: [] for c in contenders}

        def decode_run(c) -> float:
            rates[c.name].append(copy_rate_now())
            return request(c, text_inputs[c.name], args.tokens + 1)[1]

        decode = interleaved(contenders, args.runs, decode_run)
        for v in rates.values():
            del v[0]  # warm-up
        raw["decode"], raw["copy rate"] = decode, rates
        rows.append(
            (
                f"decode ({args.tokens} tok, text prompt)",
                {k: fmt(v) for k, v in decode.items()},
                "tok/s",
            )
        )

    bandwidth = copy_bandwidth()
    if "decode" in raw:
        # Each run against the limit of its own moment: copy rate / weight bytes per token.
        bound = {
            k: [d * weight_bytes[k] / r * 100 for d, r in zip(v, raw["copy rate"][k], strict=True)]
            for k, v in raw["decode"].items()
        }
        limits = {k: [r / weight_bytes[k] for r in v] for k, v in raw["copy rate"].items()}
        span = ", ".join(f"{k} {min(v):.1f}-{max(v):.1f}" for k, v in limits.items())
        rows.append(
            (
                f"decode / bandwidth limit (limit tok/s: {span})",
                {k: fmt(v, digits=0) for k, v in bound.items()},
                "%",
            )
        )
    for c in contenders:
        del c.model
    mx.clear_cache()

    fresh = {}
    if args.stages == "all":
        for kind in ("import", "load", "memory"):
            fresh[kind] = {c.name: [] for c in contenders}
            for _ in range(args.runs if kind != "memory" else 1):
                for c in contenders:
                    fresh[kind][c.name].append(in_fresh_process(kind, c.name, args))
        rows.append(
            (
                "import (fresh process)",
                {k: fmt([r["seconds"] for r in v]) for k, v in fresh["import"].items()},
                "s",
            )
        )
        rows.append(
            (
                "cold load() (fresh process)",
                {k: fmt([r["seconds"] for r in v]) for k, v in fresh["load"].items()},
                "s",
            )
        )
        rows.append(
            (
                "peak MLX memory, tiled request",
                {k: f"{v[0]['peak_mlx'] / 2**20:.0f}" for k, v in fresh["memory"].items()},
                "MiB",
            )
        )
        rows.append(
            (
                "max RSS, tiled request",
                {k: f"{v[0]['max_rss'] / 2**20:.0f}" for k, v in fresh["memory"].items()},
                "MiB",
            )
        )

    reference = None
    if args.torch_python and args.stages == "all" and dtype == "float32":
        run = [
            args.torch_python,
            __file__,
            "--reference",
            "--model",
            args.model,
            "--cache",
            str(args.cache),
        ]
        done = subprocess.run(
            run + ["--runs", str(args.runs), "--tokens", str(args.tokens)],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            reference = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            print("transformers reference failed:", done.stderr[-2000:], file=sys.stderr)

    # ratio: port speed / mlx-vlm speed (> 1 means the port is faster), from medians
    lines = [
        f"**{args.model}**"
        + (f", {args.quantize}-bit (each contender's own conversion)" if args.quantize else "")
        + (
            ", each contender's default compute dtype (port: float32 on the CPU; mlx-vlm: as "
            "stored, bf16)"
            if dtype is None
            else f", compute dtype {args.dtype} (both)"
        )
        + f", MLX {mx.__version__} CPU, "
        f"BLAS: LD_PRELOAD={os.environ.get('LD_PRELOAD', '(none)')} (BLAS libraries mapped: "
        f"{blas_in_use()}), {os.cpu_count()} cores, load average {load_avg_start[0]:.2f} at "
        f"start / {os.getloadavg()[0]:.2f} at end, copy bandwidth MLX "
        f"{bandwidth['mlx'] / 1e9:.1f} GB/s, NumPy {bandwidth['numpy'] / 1e9:.1f} GB/s, LM weights "
        f"read per token: "
        + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in weight_bytes.items())
        + f" (port's LM matmul weights in {port_weights}), {args.runs} interleaved runs after "
        f"warm-up (median ± half range), Python {platform.python_version()}.",
        "",
        "| stage | unit | port | mlx-vlm | speed-up port vs mlx-vlm | transformers (torch CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for label, values, unit in rows:
        p, v = values["port"], values["mlx-vlm"]
        pm, vm = float(p.split()[0]), float(v.split()[0])
        if unit in ("tok/s", "%"):
            ratio = pm / vm
        else:
            ratio = vm / pm if pm else float("nan")
        ref = ""
        if reference:
            key = {"vision + projector ": "vision ", "time to first token 256x384": "ttft 256x384"}
            for prefix, rk in key.items():
                if label.startswith(prefix):
                    name = rk + label[len(prefix) :] if prefix.endswith(" ") else rk
                    if name in reference:
                        ref = fmt(reference[name])
            if label.startswith("decode (") and "decode" in reference:
                ref = fmt(reference["decode"])
        lines.append(f"| {label} | {unit} | {p} | {v} | {ratio:.2f}× | {ref} |")
    if reference:
        lines.append(f"\ntransformers {reference['threads']} torch threads, float32.")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(
            table
            + "\n\n<!-- raw -->\n"
            + json.dumps({"raw": raw, "fresh": fresh, "reference": reference})
            + "\n"
        )


if __name__ == "__main__":
    main()
