"""LoRA layers and adapter folders (mlx_lfm2vl/lora.py, mlx_lfm2vl/fuse.py): trained adapters
give the same logits through load(adapter_path=...) (CPU backend installed), through the
training model and through a fused folder; QLoRA on a quantized model trains."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_lfm2vl import Lfm2VlError, load
from mlx_lfm2vl.convert import convert
from mlx_lfm2vl.fuse import fuse
from mlx_lfm2vl.fuse import main as fuse_main
from mlx_lfm2vl.loading import load_model
from mlx_lfm2vl.lora import LoRALinear, load_adapters
from mlx_lfm2vl.processor import Processor
from mlx_lfm2vl.train import TrainOptions, train

TOLERANCE = 1e-4
OPTIONS = TrainOptions(iters=3, batch_size=2, learning_rate=1e-2, val_every=0, save_every=0)


def logits_of(model, processor, image) -> np.ndarray:
    inputs = processor("What is in the picture?", images=[image])
    return np.asarray(model(**inputs)[0].astype(mx.float32))


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    error = float(np.abs(actual - expected).max())
    scale = float(np.abs(expected).max())
    assert error <= TOLERANCE * max(1.0, scale), f"{what}: error {error:.3g}, scale {scale:.3g}"


def test_lora_linear_starts_as_its_base_and_fuses_to_the_same_outputs():
    base = nn.Linear(64, 48)
    lora = LoRALinear.from_base(base, rank=4, scale=2.0, key=mx.random.key(0))
    x = mx.random.normal((3, 64), key=mx.random.key(1))
    assert mx.array_equal(lora(x), base(x))  # lora_b starts at zero
    lora.lora_b = mx.random.normal(lora.lora_b.shape, key=mx.random.key(2))
    expected = base(x) + 2.0 * (x @ lora.lora_a) @ lora.lora_b
    assert mx.allclose(lora(x), expected, atol=1e-5)
    fused = lora.fuse()
    assert type(fused) is nn.Linear and "bias" in fused
    assert mx.allclose(fused(x), expected, atol=1e-4)


def test_qlora_wraps_a_quantized_layer_and_fuses_to_the_quantized_updated_weight():
    mx.random.seed(0)  # nn.Linear's initialisation
    base = nn.Linear(128, 64).to_quantized(group_size=64, bits=4)
    lora = LoRALinear.from_base(base, rank=4, key=mx.random.key(0))
    assert lora.lora_a.shape == (128, 4)  # the unpacked input width
    lora.lora_b = 0.1 * mx.random.normal(lora.lora_b.shape, key=mx.random.key(2))
    x = mx.random.normal((2, 128), key=mx.random.key(1))
    target = mx.dequantize(base.weight, base.scales, base.biases, group_size=64, bits=4)
    target = target + lora.delta()
    assert mx.allclose(lora(x), x @ target.T + base.bias, atol=1e-4)
    # Quantized again with the base's settings: what quantizing the updated weight gives.
    fused = lora.fuse()
    assert isinstance(fused, nn.QuantizedLinear) and (fused.bits, fused.group_size) == (4, 64)
    weight = mx.dequantize(fused.weight, fused.scales, fused.biases, group_size=64, bits=4)
    expected = mx.dequantize(*mx.quantize(target, group_size=64, bits=4), group_size=64, bits=4)
    assert mx.array_equal(weight, expected)
    assert mx.allclose(fused(x), x @ expected.T + base.bias, atol=1e-4)
    # The gradient reaches lora_a and lora_b through the quantized base.
    grads = nn.value_and_grad(lora, lambda x: lora(x).sum())(x)[1]
    assert float(mx.abs(grads["lora_a"]).max()) > 0
    assert float(mx.abs(grads["lora_b"]).max()) > 0


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_adapters_round_trip_through_load_and_fuse(checkpoint_450m, conversations, tmp_path, kind):
    """Trained adapters give one set of logits: the training model's (plain, float32), load()'s
    (with the CPU backend installed on the CPU) and a fused folder's, which differ from the
    base's."""
    from reference import random_image

    options = replace(OPTIONS, full=kind == "full", train_vision=True)
    if kind == "full":
        options = replace(options, learning_rate=1e-4)
    adapter_path = tmp_path / "adapters"
    train(checkpoint_450m, conversations, adapter_path, options)
    config = json.loads((adapter_path / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == kind

    processor = Processor.from_pretrained(checkpoint_450m)
    image = random_image(200, 300, seed=2)
    plain = load_model(checkpoint_450m, dtype="float32", backend=False)
    load_adapters(plain, adapter_path)
    expected = logits_of(plain, processor, image)
    base, _ = load(checkpoint_450m)
    assert np.abs(logits_of(base, processor, image) - expected).max() > 1e-2

    adapted, _ = load(checkpoint_450m, adapter_path=adapter_path)
    assert_close(logits_of(adapted, processor, image), expected, "load(adapter_path=...)")
    result = fuse(checkpoint_450m, adapter_path, tmp_path / "fused")
    assert result.dtype == "float32"
    fused, _ = load(result.path)
    assert not any(isinstance(m, LoRALinear) for _, m in fused.named_modules())
    assert_close(logits_of(fused, processor, image), expected, "fused")


def test_qlora_on_a_quantized_model_lowers_the_loss_and_loads_and_fuses(
    checkpoint_450m, conversations, tmp_path
):
    quantized = convert(checkpoint_450m, tmp_path / "q4", quantize=True, q_bits=4).path
    adapter_path = tmp_path / "adapters"
    result = train(quantized, conversations, adapter_path, replace(OPTIONS, iters=5))
    assert result.losses[-1] < 0.9 * result.losses[0]
    model, processor = load(quantized, adapter_path=adapter_path)
    wrapped = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(isinstance(m.linear, nn.QuantizedLinear) for m in wrapped)

    with pytest.raises(Lfm2VlError, match="full fine-tuning needs a float model"):
        train(quantized, conversations, tmp_path / "full", replace(OPTIONS, full=True))

    fused = fuse(quantized, adapter_path, tmp_path / "fused").path
    config = json.loads((fused / "config.json").read_text())
    assert (
        config["quantization"]
        == json.loads((quantized / "config.json").read_text())["quantization"]
    )
    model, _ = load(fused)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def test_adapter_errors_and_the_fuse_command_line(checkpoint_450m, tmp_path, capsys):
    with pytest.raises(Lfm2VlError, match="adapter folder .* does not exist"):
        load(checkpoint_450m, adapter_path=tmp_path / "none")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "rank": 8, "scale": 1.0, "modules": ["nope"]})
    )
    (tmp_path / "bad" / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(Lfm2VlError, match="cannot read"):
        load(checkpoint_450m, adapter_path=tmp_path / "bad")
    mx.save_safetensors(str(tmp_path / "bad" / "adapters.safetensors"), {"x": mx.zeros(1)})
    with pytest.raises(Lfm2VlError, match="'nope'.*trained on another model"):
        load(checkpoint_450m, adapter_path=tmp_path / "bad")

    code = fuse_main(["--model", str(checkpoint_450m), "--adapter-path", str(tmp_path / "none")])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    # The output folder is guarded as the converter guards it.
    target: Path = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(Lfm2VlError, match="never replaced"):
        fuse(checkpoint_450m, tmp_path / "bad", target, force=True)


def test_fused_folder_is_written_whole_and_the_converter_quantizes_it(
    checkpoint_450m, lora_adapters, tmp_path, monkeypatch
):
    """A fuse that fails while writing leaves neither the folder nor a hidden partial one; a
    finished one converts to 8 bits, and the quantized model keeps the adapters' change."""
    from reference import random_image

    import mlx_lfm2vl.convert

    model = load_model(checkpoint_450m, dtype="float32", backend=False)
    load_adapters(model, lora_adapters)
    adapter_path = tmp_path / "adapters"
    shutil.copytree(lora_adapters, adapter_path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        # fuse writes its folder with the converter's writer: fail that mid-way
        patch.setattr(mlx_lfm2vl.convert, "_write_shards", fail)
        with pytest.raises(OSError, match="disk full"):
            fuse(checkpoint_450m, adapter_path, tmp_path / "fused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]

    fused = fuse(checkpoint_450m, adapter_path, tmp_path / "fused").path
    quantized = convert(fused, tmp_path / "q8", quantize=True, q_bits=8).path
    processor = Processor.from_pretrained(quantized)
    image = random_image(200, 300, seed=2)
    expected = logits_of(model, processor, image)
    base = logits_of(load(checkpoint_450m)[0], processor, image)
    q8_model, _ = load(quantized)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in q8_model.named_modules())
    q8 = logits_of(q8_model, processor, image)
    # The adapters move the logits far more than 8-bit rounding does.
    assert np.abs(q8 - expected).max() < 0.2 * np.abs(base - expected).max()


def test_generate_command_line_applies_adapters(talking_checkpoint, lora_adapters, capsys):
    from mlx_lfm2vl import generate
    from mlx_lfm2vl.generate import main as generate_main

    args = ["--model", str(talking_checkpoint), "--prompt", "Hi", "--max-tokens", "12"]
    args += ["--temperature", "0"]
    assert generate_main([*args, "--adapter-path", str(lora_adapters)]) == 0
    out = capsys.readouterr().out
    model, processor = load(talking_checkpoint, adapter_path=lora_adapters)
    expected = generate(model, processor, "Hi", max_tokens=12, temperature=0).text
    base, _ = load(talking_checkpoint)
    assert expected != generate(base, processor, "Hi", max_tokens=12, temperature=0).text
    assert out == expected + "\n"
