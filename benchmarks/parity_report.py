"""Measured max abs errors of the port against the reference, per component and fixture.

Run by hand (needs the `test` extra):

    python benchmarks/parity_report.py [--real-450m] [--metal-path] [--dtype bfloat16]

Builds the test fixtures in a temporary folder and prints a Markdown table. `--metal-path` runs
the code a Mac runs (the plain model, no CPU backend; as `pytest --metal-path` does).
`--dtype bfloat16` stores the fixtures in bf16 and computes in bf16; the reference then runs in
float32 on the same bf16 weights (the truth), and its own bf16 error is shown beside the port's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import FIXTURES, build_checkpoint  # noqa: E402
from reference import (  # noqa: E402
    image_message,
    max_error,
    port_inputs,
    random_image,
    reference_inputs,
    reference_model,
)

from mlx_lfm2vl.loading import load_model  # noqa: E402


def report(folder: Path, image_size: tuple[int, int], dtype: str, **options) -> dict[str, str]:
    ref_inputs = reference_inputs(
        folder, image_message("Describe this image."), [random_image(*image_size)], **options
    )
    reference = reference_model(folder)
    model = load_model(folder, dtype=dtype)
    inputs = port_inputs(ref_inputs)
    vision_args = {
        k: ref_inputs[k] for k in ("pixel_values", "spatial_shapes", "pixel_attention_mask")
    }
    with torch.no_grad():
        vision = reference.model.vision_tower(**vision_args).last_hidden_state
        features = torch.cat(reference.model.get_image_features(**vision_args).pooler_output)
        logits = reference(**ref_inputs).logits[0]
    vision_error = 0.0
    offset = 0
    for view, (h, w) in enumerate(ref_inputs["spatial_shapes"].tolist()):
        patches = inputs["pixel_values"][offset : offset + h * w][None]
        offset += h * w
        error, _ = max_error(model.vision_tower(patches, h, w)[0], vision[view, : h * w])
        vision_error = max(vision_error, error)
    features_error, _ = max_error(
        model.get_image_features(inputs["pixel_values"], inputs["spatial_shapes"]), features
    )
    logits_error, scale = max_error(model(**inputs)[0], logits)
    shapes = ref_inputs["spatial_shapes"].tolist()
    reference_bf16 = "-"
    if dtype == "bfloat16":
        with torch.no_grad():
            in_bf16 = reference.to(torch.bfloat16)(**ref_inputs).logits[0].float()
        reference.to(torch.float32)
        reference_bf16 = f"{max_error(mx.array(in_bf16.numpy()), logits)[0]:.2e}"
    return {
        "views": f"{len(shapes)} ({', '.join(sorted({f'{h}x{w}' for h, w in shapes}))})",
        "tokens": str(ref_inputs["input_ids"].shape[1]),
        "vision tower": f"{vision_error:.2e}",
        "projector": f"{features_error:.2e}",
        "logits": f"{logits_error:.2e} (scale {scale:.2f})",
        "reference's own bf16 logits": reference_bf16,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--real-450m", action="store_true", help="also the real 450M shapes")
    parser.add_argument("--metal-path", action="store_true", help="the plain model, as on a Mac")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.metal_path:
        import mlx_lfm2vl.loading

        mlx_lfm2vl.loading.computes_on_cpu = lambda: False
    cases = {name: ((768, 1024), {"max_tiles": 4}) for name in FIXTURES}
    if args.real_450m:
        cases["lfm2-vl-450m-real"] = ((256, 384), {})
    with tempfile.TemporaryDirectory() as root:
        rows = {}
        for name, (size, options) in cases.items():
            stored = "bfloat16" if name.endswith("-real") or args.dtype == "bfloat16" else "float32"
            folder = build_checkpoint(name, Path(root) / name, dtype=stored)
            rows[name] = report(folder, size, args.dtype, **options)
    columns = ["views", "tokens", "vision tower", "projector", "logits"]
    if args.dtype == "bfloat16":
        columns.append("reference's own bf16 logits")
    path = "the Metal code path (plain MLX model)" if args.metal_path else "the CPU backend"
    print(f"MLX {mx.__version__}, torch {torch.__version__}, {args.dtype} compute, {path}\n")
    print("| fixture | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(row[c] for c in columns) + " |")


if __name__ == "__main__":
    main()
