"""The converter: output layout, round trip, recipes and fallbacks, safe writing, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lfm2vl.convert import (
    ConversionResult,
    _requantize_affine,
    convert,
    estimate_bytes,
    main,
    quantization_plan,
    quantize_model,
)
from mlx_lfm2vl.errors import Lfm2VlError
from mlx_lfm2vl.image_processor import ImageProcessor
from mlx_lfm2vl.loading import load_model

REPO = Path(__file__).resolve().parents[1]
IDS = mx.array([[1, 6, 1200, 3000, 498, 499, 4000, 5000, 700]], dtype=mx.int32)
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def image_inputs(folder: Path) -> dict:
    """A small image prompt: exercises the vision tower and projector, not only the LM."""
    config = json.loads((folder / "config.json").read_text())
    y, x = np.mgrid[0:160, 0:224]
    image = np.stack([x % 256, y % 256, (x * y) % 256], axis=-1).astype(np.uint8)
    batch = ImageProcessor.from_pretrained(folder)(image, do_image_splitting=False)
    n_tokens = int(sum((h // 2) * (w // 2) for h, w in batch.spatial_shapes))
    ids = [1, 6, 1200, 498] + [config["image_token_id"]] * n_tokens + [499, 4000, 5000, 700]
    return {
        "input_ids": mx.array([ids], dtype=mx.int32),
        "pixel_values": mx.array(batch.pixel_values),
        "spatial_shapes": batch.spatial_shapes,
    }


def in_memory(source: Path, recipe: str | None, dtype: mx.Dtype) -> nn.Module:
    """What the converter computes, without writing: quantized as it does, float32 compute."""
    model = load_model(source, dtype=mx.float32)
    if recipe is not None:
        quantize_model(model, quantization_plan(model, recipe), dtype)
    # Non-quantized weights are stored in `dtype`; the loader reads them back as float32.
    model.update(
        tree_unflatten(
            [
                (name, value.astype(dtype).astype(mx.float32))
                for name, value in tree_flatten(model.parameters())
                if mx.issubdtype(value.dtype, mx.floating)
            ]
        )
    )
    return model


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("recipe", [None, "uniform-8", "mixed-4"])
def test_round_trip_gives_the_logits_of_converting_in_memory(checkpoint, tmp_path, recipe):
    result = convert(checkpoint, tmp_path / "out", quantize=recipe is not None, q_recipe=recipe)
    loaded = load_model(result.path, dtype="float32")  # the in-memory model's arithmetic
    expected = in_memory(checkpoint, recipe, mx.bfloat16)
    inputs = image_inputs(checkpoint)
    # Same stored values, same float32 arithmetic: identical up to summation order.
    assert mx.abs(loaded(**inputs) - expected(**inputs)).max().item() <= 1e-5


def test_output_folder_holds_config_shards_and_every_processor_file(checkpoint_450m, tmp_path):
    result = convert(checkpoint_450m, tmp_path / "out", quantize=True)
    names = listing(result.path)
    assert {"config.json", "model.safetensors", "model.safetensors.index.json"} <= names
    assert set(PROCESSOR_FILES) <= names
    for name in PROCESSOR_FILES:
        assert (result.path / name).read_bytes() == (checkpoint_450m / name).read_bytes()
    config = json.loads((result.path / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["quantization"]["recipe"] == "mixed-4"
    # MLX names and layouts: the depthwise conv is (D, K, 1) and stays bfloat16.
    weights = mx.load(str(result.path / "model.safetensors"))
    conv = weights["language_model.layers.0.conv.conv.weight"]
    assert conv.shape[1:] == (3, 1) and conv.dtype == mx.bfloat16
    assert weights["language_model.layers.0.feed_forward.w1.scales"].dtype == mx.bfloat16
    assert not any(name.startswith("model.") for name in weights)


def test_default_4bit_recipe_layout_in_config(checkpoint_16b, tmp_path):
    result = convert(checkpoint_16b, tmp_path / "out", quantize=True, q_bits=4)
    section = result.quantization
    assert (section["bits"], section["group_size"], section["mode"]) == (4, 64, "affine")
    assert section["recipe"] == "mixed-4"
    eight = {"group_size": 64, "bits": 8, "mode": "affine"}
    assert section["language_model.embed_tokens"] == eight
    assert section["multi_modal_projector.linear_1"] == eight
    assert section["vision_tower.encoder.layers.0.self_attn.q_proj"] == eight
    assert "language_model.layers.0.feed_forward.w1" not in section  # the default: 4-bit
    # The 1.6B-like vision MLP is 344 wide (like the real 4304): no supported group size
    # divides it, so fc2 stays float, and the config says so.
    assert section["vision_tower.encoder.layers.0.mlp.fc2"] is False
    assert section["vision_tower.embeddings.position_embedding"] is False
    model = load_model(result.path)
    assert isinstance(model.vision_tower.encoder.layers[0].mlp.fc2, nn.Linear)
    assert isinstance(model.language_model.embed_tokens, nn.QuantizedEmbedding)
    assert model.language_model.embed_tokens.bits == 8
    assert model.language_model.layers[0].feed_forward.w1.bits == 4


def test_layers_narrower_than_the_group_get_a_smaller_group(checkpoint_450m, tmp_path):
    # The 450M-like fixture's vision width is 96: group 64 does not divide it, 32 does.
    result = convert(checkpoint_450m, tmp_path / "out", quantize=True, q_recipe="uniform-4")
    layer = result.quantization["vision_tower.encoder.layers.0.self_attn.q_proj"]
    assert layer == {"group_size": 32, "bits": 4, "mode": "affine"}
    model = load_model(result.path)
    assert model.vision_tower.encoder.layers[0].self_attn.q_proj.group_size == 32


def test_depthwise_conv_and_position_table_are_never_quantized(checkpoint_450m):
    model = load_model(checkpoint_450m)
    plan = quantization_plan(model, "uniform-4")
    assert plan["vision_tower.embeddings.position_embedding"] is False
    assert not any("conv.conv" in path for path in plan)  # Conv1d has no quantized form
    quantize_model(model, plan)
    assert isinstance(model.language_model.layers[0].conv.conv, nn.Conv1d)


def test_recipe_selection_from_bits_and_names(checkpoint_450m, tmp_path):
    assert convert(checkpoint_450m, tmp_path / "a", quantize=True, q_bits=8).quantization[
        "recipe"
    ] == ("uniform-8")
    with pytest.raises(Lfm2VlError, match="4-bit recipe"):
        convert(checkpoint_450m, tmp_path / "b", quantize=True, q_bits=8, q_recipe="mixed-4")
    with pytest.raises(Lfm2VlError, match="add -q"):
        convert(checkpoint_450m, tmp_path / "c", q_recipe="mixed-4")
    with pytest.raises(Lfm2VlError, match="unknown recipe"):
        convert(checkpoint_450m, tmp_path / "d", quantize=True, q_recipe="fancy")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_float_formats_convert_and_load(checkpoint_450m, tmp_path):
    result = convert(checkpoint_450m, tmp_path / "out", quantize=True, q_mode="mxfp4")
    model = load_model(result.path)
    w1 = model.language_model.layers[0].feed_forward.w1
    embedding = model.language_model.embed_tokens
    assert (w1.mode, w1.bits, w1.group_size) == ("mxfp4", 4, 32)
    assert (embedding.mode, embedding.bits) == ("mxfp8", 8)  # the recipe's 8-bit level
    inputs = image_inputs(checkpoint_450m)
    reference = load_model(checkpoint_450m)(**inputs)
    assert np.isfinite(np.array(model(**inputs).astype(mx.float32))).all()
    assert mx.abs(model(**inputs) - reference).max().item() < mx.abs(reference).max().item()


@pytest.mark.cpu_backend
def test_loader_casts_scales_to_the_compute_dtype_without_changing_logits(
    checkpoint_450m, tmp_path
):
    result = convert(checkpoint_450m, tmp_path / "out", quantize=True)  # bf16 scales on disk
    model = load_model(result.path)  # CPU default: float32 compute
    w1 = model.language_model.layers[0].feed_forward.w1
    assert w1.scales.dtype == mx.float32 and w1.biases.dtype == mx.float32
    inputs = image_inputs(checkpoint_450m)
    fast = model(**inputs)
    # The former behaviour: scales and biases kept in bf16. bf16 -> float32 is exact, so the
    # dequantized weights are the same; only the kernel's accumulation precision differs.
    model.update(
        tree_unflatten(
            [
                (name, value.astype(mx.bfloat16))
                for name, value in tree_flatten(model.parameters())
                if name.endswith(("scales", "biases"))
            ]
        )
    )
    slow = model(**inputs)
    assert mx.abs(fast - slow).max().item() <= 2e-2 * mx.abs(fast).max().item()
    bf16 = load_model(result.path, dtype="bfloat16").language_model.layers[0].feed_forward.w1
    assert bf16.scales.dtype == mx.bfloat16


def test_on_metal_quantized_layers_keep_their_stored_bf16_scales(
    checkpoint_450m, tmp_path, monkeypatch
):
    """What a Mac runs: no cast at load, so the quantized matmuls compute in bf16."""
    import mlx_lfm2vl.loading

    result = convert(checkpoint_450m, tmp_path / "out", quantize=True)
    monkeypatch.setattr(mlx_lfm2vl.loading, "computes_on_cpu", lambda: False)
    model = load_model(result.path)
    w1 = model.language_model.layers[0].feed_forward.w1
    assert w1.scales.dtype == mx.bfloat16 and w1.biases.dtype == mx.bfloat16
    inputs = image_inputs(checkpoint_450m)
    logits = model(**inputs)
    assert logits.dtype == mx.bfloat16
    expected = in_memory(checkpoint_450m, "mixed-4", mx.bfloat16)(**inputs)
    scale = mx.abs(expected).max().item()
    # bf16 activations through 14 layers of random weights, and on Linux MLX's scalar quantized
    # kernel also accumulates in bf16 (Metal's accumulates in float32): measured 0.10 x scale
    # here. Wrong scales or codes would be off by the whole scale.
    assert mx.abs(logits.astype(mx.float32) - expected).max().item() <= 0.2 * scale


def test_bf16_scales_recomputed_codes_beat_plain_rounding():
    # Pins the uint32 packing this module writes by hand (32 // bits codes per word, first code
    # in the lowest bits): with float32 scales it must reproduce mx.quantize bit for bit.
    weight = mx.random.normal((64, 512), key=mx.random.key(0)) * 0.02
    for bits in (4, 8):
        params = {"group_size": 64, "bits": bits, "mode": "affine"}
        packed, scales, biases = _requantize_affine(weight, params, mx.float32)
        expected = mx.quantize(weight, group_size=64, bits=bits)
        for ours, theirs in zip((packed, scales, biases), expected, strict=True):
            assert mx.array_equal(ours, theirs)

        def error(q, s, b, bits=bits):
            restored = mx.dequantize(q, s, b, group_size=64, bits=bits)
            return mx.sqrt(mx.mean((restored.astype(mx.float32) - weight) ** 2)).item()

        ours = error(*_requantize_affine(weight, params, mx.bfloat16))
        plain = error(*mx.quantize(weight.astype(mx.bfloat16), group_size=64, bits=bits))
        assert ours <= plain
        if bits == 8:
            assert ours < 0.9 * plain  # measured: ~20% lower error at 8 bits


@pytest.mark.parametrize("recipe", ["uniform-8", "mixed-4", "uniform-4"])
def test_estimated_size_matches_written_size(checkpoint_16b, tmp_path, recipe):
    result = convert(checkpoint_16b, tmp_path / "out", quantize=True, q_recipe=recipe)
    model = load_model(checkpoint_16b)
    estimate = estimate_bytes(model, quantization_plan(model, recipe), mx.bfloat16)
    # The files add only their JSON headers (names, shapes, offsets) to the tensor bytes.
    assert estimate <= result.bytes_on_disk <= estimate + 64_000


def test_sharded_output_loads_and_a_missing_or_damaged_shard_fails_clearly(
    checkpoint_450m, tmp_path
):
    result = convert(checkpoint_450m, tmp_path / "out", quantize=True, max_shard_bytes=4 << 20)
    shards = sorted(result.path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    expected = in_memory(checkpoint_450m, "mixed-4", mx.bfloat16)(IDS)
    loaded = load_model(result.path, dtype="float32")
    assert mx.abs(loaded(IDS) - expected).max().item() <= 1e-5

    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(Lfm2VlError, match="damaged or incomplete"):
        load_model(result.path)
    shards[1].unlink()
    with pytest.raises(Lfm2VlError, match="missing"):
        load_model(result.path)


class Injected(Exception):
    pass


def fail_while_writing(stage: str, done: int, total: int) -> None:
    if stage == "write":
        raise Injected


def test_failure_leaves_no_output_and_no_temporary_folder(checkpoint_450m, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(Injected):
        convert(checkpoint_450m, target, progress=fail_while_writing)
    assert listing(tmp_path) == set()


def test_existing_output_needs_force_and_survives_a_failed_replacement(checkpoint_450m, tmp_path):
    target = tmp_path / "out"
    convert(checkpoint_450m, target, quantize=True)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(Lfm2VlError, match="--force"):
        convert(checkpoint_450m, target)
    with pytest.raises(Injected):
        convert(checkpoint_450m, target, force=True, progress=fail_while_writing)
    assert listing(tmp_path) == {"out"}
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before

    result = convert(checkpoint_450m, target, force=True)  # float now: the files change
    assert "quantization" not in json.loads((target / "config.json").read_text())
    assert listing(tmp_path) == {"out"}
    assert isinstance(result, ConversionResult)


def test_force_replaces_an_empty_folder(checkpoint_450m, tmp_path):
    (tmp_path / "out").mkdir()
    convert(checkpoint_450m, tmp_path / "out", force=True)
    assert "model.safetensors" in listing(tmp_path / "out")


def test_force_never_replaces_a_folder_that_is_not_a_converted_model(
    checkpoint_450m, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    # The report: `--mlx-path . --force` wiped the working folder.
    monkeypatch.chdir(work)
    for path in (".", work, tmp_path / "work" / ".." / "work"):
        with pytest.raises(Lfm2VlError, match="not a model folder written by this converter"):
            convert(checkpoint_450m, path, force=True)
    assert listing(work) == {"notes.txt"} and listing(tmp_path) == {"work"}
    # A published (PyTorch-format) checkpoint is not this converter's output either.
    hf_copy = tmp_path / "hf"
    shutil.copytree(checkpoint_450m, hf_copy)
    with pytest.raises(Lfm2VlError, match="not a model folder written by this converter"):
        convert(checkpoint_450m, hf_copy, force=True)
    assert listing(hf_copy) == listing(checkpoint_450m)


def test_force_never_replaces_a_file_and_an_empty_path_is_an_error(
    checkpoint_450m, tmp_path, monkeypatch
):
    file = tmp_path / "model.bin"
    file.write_bytes(b"data")
    with pytest.raises(Lfm2VlError, match="not a folder"):
        convert(checkpoint_450m, file, force=True)
    assert file.read_bytes() == b"data"
    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):  # an unset shell variable
        with pytest.raises(Lfm2VlError, match="output path is empty"):
            convert(checkpoint_450m, empty, force=True)
    assert listing(tmp_path) == {"model.bin"}


def test_unwritable_output_fails_before_the_model_is_loaded(checkpoint_450m, tmp_path):
    stages = []
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = [blocker / "out"]
    if sys.platform == "linux":
        unwritable.append(Path("/proc/x7"))  # the report's example; root cannot write there either
    for target in unwritable:
        with pytest.raises(Lfm2VlError, match="writable --mlx-path"):
            convert(checkpoint_450m, target, progress=lambda *a: stages.append(a))
    assert stages == []  # not even the "load" stage started
    assert listing(tmp_path) == {"a-file"}


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_output_folder_modes_follow_the_umask(checkpoint_450m, tmp_path, umask):
    previous = os.umask(umask)
    try:
        result = convert(checkpoint_450m, tmp_path / "out")
    finally:
        os.umask(previous)
    assert result.path.stat().st_mode & 0o777 == 0o777 & ~umask  # was 0700 (mkdtemp's)
    assert (result.path / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_stale_partial_folders_are_removed_unless_a_live_process_holds_them(
    checkpoint_450m, tmp_path
):
    import fcntl

    stale = tmp_path / ".out.dead1234.partial"
    held = tmp_path / ".out.live5678.partial"
    other = tmp_path / ".other.dead1234.partial"  # another output's: not ours to judge
    for folder in (stale, held, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    lock = os.open(held, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a running conversion holds its folder
    try:
        convert(checkpoint_450m, tmp_path / "out")
        assert listing(tmp_path) == {"out", held.name, other.name}
    finally:
        os.close(lock)
    convert(checkpoint_450m, tmp_path / "out", force=True)  # nobody holds it now
    assert listing(tmp_path) == {"out", other.name}


def test_damaged_shard_index_of_the_source_is_a_clear_error(checkpoint_450m, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(checkpoint_450m, source)
    (source / "model.safetensors.index.json").write_text("{not json")
    code, out, err = run_main(
        ["--hf-path", str(source), "--mlx-path", str(tmp_path / "out")], capsys
    )
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "loading the checkpoint...",
        err.splitlines()[-1],  # one line for the error, no traceback
    ]
    assert err.splitlines()[-1].startswith("error: ") and "index.json is damaged" in err
    assert listing(tmp_path) == {"source"}


def test_file_system_without_flock_converts_and_removes_nothing(
    checkpoint_450m, tmp_path, monkeypatch
):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    other_run = tmp_path / ".out.other123.partial"  # cannot tell whether it is stale: kept
    other_run.mkdir()
    result = convert(checkpoint_450m, tmp_path / "out")
    assert listing(tmp_path) == {"out", other_run.name}
    assert "model.safetensors" in listing(result.path)


def test_output_inside_the_source_is_refused(checkpoint_450m):
    with pytest.raises(Lfm2VlError, match="overlaps"):
        convert(checkpoint_450m, checkpoint_450m / "mlx", quantize=True)
    assert not (checkpoint_450m / "mlx").exists()


def test_converting_a_quantized_folder_is_refused(checkpoint_450m, tmp_path):
    result = convert(checkpoint_450m, tmp_path / "q", quantize=True)
    with pytest.raises(Lfm2VlError, match="already quantized"):
        convert(result.path, tmp_path / "again", quantize=True)


def test_cli_converts_and_reports_errors_in_one_line(checkpoint_450m, tmp_path, capsys):
    target = tmp_path / "out"
    args = ["--hf-path", str(checkpoint_450m), "--mlx-path", str(target), "-q", "--q-bits", "8"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert "uniform-8" in captured.out and "quantize: " in captured.err
    assert json.loads((target / "config.json").read_text())["quantization"]["bits"] == 8

    with pytest.raises(SystemExit) as exit_info:
        main(args)  # exists, no --force
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--force" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    "args",
    [
        ["--hf-path", "x", "--q-bits", "3"],
        [],  # no --hf-path
        ["--hf-path", "x", "--frobnicate"],
    ],
)
def test_cli_usage_errors_are_one_line_like_generate(args, capsys):
    code, out, err = run_main(args, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and err.strip().endswith("(see --help)")


def test_cli_output_errors_are_one_line_before_loading(checkpoint_450m, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for mlx_path in ("", str(blocker / "out"), str(blocker)):
        code, out, err = run_main(
            ["--hf-path", str(checkpoint_450m), "--mlx-path", mlx_path], capsys
        )
        assert code == 1 and out == ""
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert "loading the checkpoint" not in err


def test_cli_help_describes_the_command_and_version_is_the_package_version(capsys):
    import mlx_lfm2vl

    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    assert "Convert a Hugging Face LFM2-VL checkpoint to an MLX model folder" in out
    assert "--version" in out
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out.strip().endswith(f"version {mlx_lfm2vl.__version__}")
    assert mlx_lfm2vl.__version__ != "0.0.0+unknown"  # the tests run on an installed package


# A conversion through the real CLI (`main`) that stops once its first shard is written, so a
# signal lands while the partial output is on disk; "writing" on stdout says it got there.
# Ctrl-C as in a terminal: a test run started in the background by a non-interactive shell
# (`cmd &`) hands its children SIGINT ignored, and Python then keeps ignoring it.
BLOCKED_CLI = """
import signal, sys, time
import mlx_lfm2vl.convert as convert

signal.signal(signal.SIGINT, signal.default_int_handler)

def progress(stage, done, total):
    if stage == "write":
        print("writing", flush=True)
        time.sleep(120)

convert._cli_progress = progress
convert.main(sys.argv[1:])
"""


def start_blocked_conversion(source: Path, target: Path, *flags: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_CLI, "--hf-path", str(source), "--mlx-path", str(target)]
        + list(flags),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert process.stdout.readline() == "writing\n", process.stderr.read()
    return process


def partial_folders(folder: Path) -> list[Path]:
    return sorted(folder.glob(".out.*.partial"))


@pytest.mark.parametrize(
    "signum, code, message",
    [
        (signal.SIGTERM, 143, "error: stopped by SIGTERM; the partial output was removed"),
        (signal.SIGHUP, 129, "error: stopped by SIGHUP; the partial output was removed"),
        (signal.SIGINT, 130, "aborted"),  # Ctrl-C, as the generate CLI words it
    ],
    ids=["SIGTERM", "SIGHUP", "SIGINT"],
)
def test_cli_stopped_by_a_signal_removes_its_partial_output(
    checkpoint_450m, tmp_path, signum, code, message
):
    process = start_blocked_conversion(checkpoint_450m, tmp_path / "out")
    [partial] = partial_folders(tmp_path)
    assert (partial / "model.safetensors").exists()
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code
    assert err.strip() == message and "Traceback" not in err
    assert listing(tmp_path) == set()


def test_partial_output_of_a_killed_conversion_is_removed_by_the_next_one(
    checkpoint_450m, tmp_path
):
    killed = start_blocked_conversion(checkpoint_450m, tmp_path / "out")
    killed.kill()  # SIGKILL: no clean-up can run
    killed.communicate(timeout=60)
    [stale] = partial_folders(tmp_path)
    running = start_blocked_conversion(checkpoint_450m, tmp_path / "out")
    [live] = [p for p in partial_folders(tmp_path) if p != stale]
    assert not stale.exists()  # removed by the second conversion as it started

    convert(checkpoint_450m, tmp_path / "out")  # a third one, while the second still runs
    assert partial_folders(tmp_path) == [live]  # its owner is alive: left alone
    running.send_signal(signal.SIGTERM)
    running.communicate(timeout=60)
    assert running.returncode == 143
    assert listing(tmp_path) == {"out"}
    assert "model.safetensors" in listing(tmp_path / "out")


def test_top_level_entry_point_runs_the_same_cli():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, str(REPO / "convert.py"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "--q-recipe" in out and "mixed-4" in out
