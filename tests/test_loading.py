"""Loading checkpoints: layouts, dtypes, shards, and the errors a user can run into."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from reference import max_error

from mlx_lfm2vl import Lfm2VlError
from mlx_lfm2vl.cpu.blas import bf16_product_tag
from mlx_lfm2vl.loading import hf_to_mlx_name, load_model

PROMPT = mx.array([[1, 6, 600, 700, 800, 900, 7, 6, 650]], dtype=mx.int32)


def text_logits(folder: Path, **kwargs) -> mx.array:
    return load_model(folder, **kwargs)(PROMPT)


def fresh_reference(folder: Path):
    """A reference model of its own: casting the shared cached one would change it for others."""
    from transformers import Lfm2VlForConditionalGeneration

    return Lfm2VlForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite_weights(folder: Path, rename) -> None:
    """Rewrite model.safetensors with every tensor name passed through `rename`."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    save_file(
        {rename(k): v for k, v in tensors.items() if rename(k)},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )


def test_sharded_bf16_and_fp16_checkpoints_load_and_match_the_reference(tmp_path, checkpoint_450m):
    """bf16/fp16 weights in small shards; the reference reads the same rounded weights."""
    from transformers import Lfm2VlForConditionalGeneration

    for dtype in (torch.bfloat16, torch.float16):
        folder = tmp_path / str(dtype)
        copy_checkpoint(checkpoint_450m, folder)
        (folder / "model.safetensors").unlink()
        fresh_reference(checkpoint_450m).to(dtype).save_pretrained(folder, max_shard_size="5MB")
        assert (folder / "model.safetensors.index.json").exists()
        assert len(list(folder.glob("*.safetensors"))) > 1
        reference = Lfm2VlForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            expected = reference(torch.tensor(np.asarray(PROMPT), dtype=torch.long)).logits[0]
        # float32 compute on every device: this pins reading, not the compute dtype
        error, scale = max_error(text_logits(folder, dtype="float32")[0], expected)
        assert error <= 1e-4 * max(1.0, scale), (dtype, error)


def test_stored_dtype_is_kept_when_asked(tmp_path, checkpoint_450m, monkeypatch):
    folder = copy_checkpoint(checkpoint_450m, tmp_path / "bf16")
    (folder / "model.safetensors").unlink()
    fresh_reference(checkpoint_450m).to(torch.bfloat16).save_pretrained(folder)
    model = load_model(folder, dtype="bfloat16")
    assert model.language_model.embed_tokens.weight.dtype == mx.bfloat16
    # Float32 compute with the forwarder keeps the LM's matmul weights bf16 (test_blas_preload);
    # without it, or told not to, every weight is cast.
    monkeypatch.setenv("MLX_LFM2VL_BF16_WEIGHTS", "0")
    bf16_product_tag.cache_clear()
    try:
        model = load_model(folder, dtype="float32")
    finally:
        bf16_product_tag.cache_clear()
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}


@pytest.mark.parametrize(
    "layout",
    [
        # transformers 4.x saved the SigLIP2 weights one level deeper.
        lambda k: k.replace("model.vision_tower.", "model.vision_tower.vision_model."),
        # Aug-2025 remote code: no top-level "model.", LM weights under language_model.model.
        lambda k: (
            k.replace("model.language_model.", "language_model.model.")
            .replace("model.vision_tower.", "vision_tower.vision_model.")
            .replace("model.multi_modal_projector.", "multi_modal_projector.")
        ),
    ],
    ids=["transformers-4", "remote-code-2025-08"],
)
def test_older_weight_layouts_give_identical_logits(tmp_path, checkpoint_16b, layout):
    folder = copy_checkpoint(checkpoint_16b, tmp_path / "old")
    rewrite_weights(folder, layout)
    assert mx.array_equal(text_logits(folder), text_logits(checkpoint_16b))


def test_name_mapping_covers_every_published_layout():
    assert hf_to_mlx_name("model.language_model.layers.0.conv.conv.weight") == (
        "language_model.layers.0.conv.conv.weight"
    )
    assert hf_to_mlx_name("language_model.lm_head.weight") == "lm_head.weight"
    assert hf_to_mlx_name("vision_tower.vision_model.post_layernorm.bias") == (
        "vision_tower.post_layernorm.bias"
    )
    assert hf_to_mlx_name("model.multi_modal_projector.linear_1.weight") == (
        "multi_modal_projector.linear_1.weight"
    )


def test_unused_projector_layernorm_weights_are_ignored(tmp_path, checkpoint_root):
    """Published LFM2.5 repos ship projector LayerNorm weights while not using them."""
    from conftest import fixture_checkpoint
    from safetensors.numpy import load_file, save_file

    source = fixture_checkpoint("lfm2.5-vl", checkpoint_root)
    folder = copy_checkpoint(source, tmp_path / "with-ln")
    tensors = load_file(folder / "model.safetensors")
    width = tensors["model.multi_modal_projector.linear_1.weight"].shape[1]
    tensors["model.multi_modal_projector.layer_norm.weight"] = np.ones(width, np.float32)
    tensors["model.multi_modal_projector.layer_norm.bias"] = np.zeros(width, np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert mx.array_equal(text_logits(folder), text_logits(source))


def test_missing_and_unexpected_tensors_are_named(tmp_path, checkpoint_450m):
    folder = copy_checkpoint(checkpoint_450m, tmp_path / "missing")
    rewrite_weights(folder, lambda k: None if k.endswith("layers.3.ffn_norm.weight") else k)
    with pytest.raises(Lfm2VlError, match=r"missing 1: language_model\.layers\.3\.ffn_norm"):
        load_model(folder)

    folder = copy_checkpoint(checkpoint_450m, tmp_path / "unexpected")
    rewrite_weights(folder, lambda k: k.replace("layers.4.ffn_norm", "layers.4.extra_norm"))
    with pytest.raises(Lfm2VlError, match=r"unexpected 1: language_model\.layers\.4\.extra_norm"):
        load_model(folder)


def test_config_from_another_checkpoint_is_a_clear_shape_error(tmp_path, checkpoint_450m):
    folder = copy_checkpoint(checkpoint_450m, tmp_path / "mismatch")
    config = json.loads((folder / "config.json").read_text())
    config["projector_hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Lfm2VlError, match="has shape"):
        load_model(folder)


def test_missing_or_damaged_shards_are_clear_errors(tmp_path, checkpoint_450m):
    folder = copy_checkpoint(checkpoint_450m, tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    fresh_reference(checkpoint_450m).save_pretrained(folder, max_shard_size="5MB")
    shards = sorted(folder.glob("model-*.safetensors"))
    damaged = shards[0].read_bytes()
    shards[0].write_bytes(damaged[: len(damaged) // 2])
    with pytest.raises(Lfm2VlError, match="damaged or incomplete"):
        load_model(folder)
    shards[0].unlink()
    with pytest.raises(Lfm2VlError, match=f"{shards[0].name}.*missing"):
        load_model(folder)


@pytest.mark.parametrize(
    "index",
    [
        "{not json",
        '{"metadata": {"total_size": 1}}',  # no weight_map
        '{"weight_map": ["model.safetensors"]}',
        '{"weight_map": {"lm_head.weight": 5}}',
        "[]",
    ],
    ids=["invalid-json", "no-weight-map", "list", "not-a-file-name", "not-an-object"],
)
def test_damaged_shard_index_is_a_clear_error(tmp_path, checkpoint_450m, index):
    folder = copy_checkpoint(checkpoint_450m, tmp_path / "ckpt")
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(Lfm2VlError, match="index.json is damaged or incomplete"):
        load_model(folder)


def test_folder_without_weights_or_config_is_a_clear_error(tmp_path, checkpoint_450m):
    with pytest.raises(Lfm2VlError, match="config.json"):
        load_model(tmp_path)
    shutil.copy(checkpoint_450m / "config.json", tmp_path)
    with pytest.raises(Lfm2VlError, match="no \\*.safetensors"):
        load_model(tmp_path)
    with pytest.raises(Lfm2VlError, match="neither a checkpoint folder nor a hub id"):
        load_model(tmp_path / "does-not-exist")


def test_hub_id_that_cannot_be_fetched_says_how_to_pass_a_local_folder(tmp_path):
    """Offline, with an empty hub cache: the message names the fix, and nothing is printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = (
        "from mlx_lfm2vl.loading import load_model\n"
        "from mlx_lfm2vl import Lfm2VlError\n"
        "try:\n    load_model('LiquidAI/LFM2-VL-450M')\n"
        "except Lfm2VlError as e:\n    print('ERROR', e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ERROR could not get 'LiquidAI/LFM2-VL-450M'")
    assert "pass its folder instead" in result.stdout


def test_long_hub_errors_are_cut_between_words(monkeypatch):
    import huggingface_hub

    reason = (
        "Repository Not Found for url: https://huggingface.co/api/models/LiquidAI/LFM2-VL-9B/"
        "revision/main. Please make sure you specified the correct `repo_id` and `repo_type`. "
        "If you are trying to access a private or gated repo, make sure you are authenticated."
    )

    def unavailable(*args, **kwargs):
        raise OSError(reason)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unavailable)
    with pytest.raises(Lfm2VlError) as error:
        load_model("LiquidAI/LFM2-VL-9B")
    shown = str(error.value).split("(OSError: ", 1)[1].split(" ...)", 1)[0]
    assert len(shown) <= 160 and reason.startswith(shown)
    assert reason[len(shown)] == " "  # the cut falls between two words


def test_importing_and_loading_never_imports_torch_or_transformers(checkpoint_450m):
    code = (
        "import sys\n"
        "import mlx_lfm2vl\n"
        "from mlx_lfm2vl.loading import load_model\n"
        f"model = load_model({str(checkpoint_450m)!r})\n"
        "heavy = [m for m in ('torch', 'transformers', 'mlx_lm') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_on_metal_load_keeps_the_stored_dtype_and_never_imports_the_cpu_backend(
    tmp_path, checkpoint_450m
):
    """What a Mac runs: the device question answered "not the CPU" (see tests/conftest.py)."""
    folder = copy_checkpoint(checkpoint_450m, tmp_path / "bf16")
    (folder / "model.safetensors").unlink()
    fresh_reference(checkpoint_450m).to(torch.bfloat16).save_pretrained(folder)
    code = (
        "import sys\n"
        "import mlx.core as mx\n"
        "from mlx.utils import tree_flatten\n"
        "import mlx_lfm2vl.loading as loading\n"
        "loading.computes_on_cpu = lambda: False\n"
        "from mlx_lfm2vl import generate, load\n"
        f"model, processor = load({str(folder)!r})\n"
        "generate(model, processor, 'Hi', max_tokens=2)\n"
        "dtypes = {str(v.dtype) for _, v in tree_flatten(model.parameters())}\n"
        "print(sorted(dtypes), 'mlx_lfm2vl.cpu' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("]")[0] == "['mlx.core.bfloat16'"
    assert result.stdout.split("]")[1].split() == ["False"]
