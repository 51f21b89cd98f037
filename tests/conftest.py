"""Shared fixtures: tiny random-weight checkpoints built once per test session by the reference.

Two ways to run the suite, both on this machine's CPU:

- `python -m pytest`: as MLX's CPU backend runs the port (`mlx_lfm2vl.cpu` installed by load(),
  float32 compute by default).
- `python -m pytest --metal-path`: as a Mac runs it: load() installs nothing (the plain MLX model
  of `mlx_lfm2vl/models/`) and keeps the stored dtype, bf16 for bf16 checkpoints. Only the
  device question is answered differently (`loading.computes_on_cpu`); MLX still computes on
  the CPU, so what this checks is the code and its numbers, not Metal's kernels or speed.

Tests marked `cpu_backend` test the CPU backend itself: they run on MLX's CPU device in both
modes (and on a Mac), with the CPU backend installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

# CI runs the property tests on a fixed sequence of examples so that a landing never depends on
# luck; local runs keep exploring new examples (and hypothesis replays any failure it found).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

import mlx.core as mx  # noqa: E402
from checkpoints import FIXTURES, build_checkpoint  # noqa: E402

import mlx_lfm2vl.loading  # noqa: E402

_computes_on_cpu = mlx_lfm2vl.loading.computes_on_cpu


def pytest_addoption(parser):
    parser.addoption(
        "--metal-path",
        action="store_true",
        help="run the code a Mac runs (the plain MLX model in its stored dtype, no CPU backend), "
        "emulated on MLX's CPU",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_backend: tests MLX's CPU backend itself; runs on the CPU device in any mode"
    )


def pytest_report_header(config):
    if config.getoption("--metal-path"):
        return "mlx-lfm2vl: the Metal code path (plain MLX model, stored dtype), on the CPU"
    return "mlx-lfm2vl: the CPU backend code path"


def metal_path(config) -> bool:
    return config.getoption("--metal-path")


@pytest.fixture(scope="session", autouse=True)
def code_path(request):
    """ "cpu" or "metal": how load() prepares models in this session (see the module docstring).
    Session-wide, so that models loaded by module- and session-scoped fixtures follow it too."""
    if not metal_path(request.config):
        yield "cpu" if _computes_on_cpu() else "metal"
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mlx_lfm2vl.loading, "computes_on_cpu", lambda: False)
        yield "metal"


@pytest.fixture(autouse=True)
def cpu_backend_pinned(request, code_path):
    """Tests marked `cpu_backend` run on MLX's CPU device with the CPU backend, in any mode."""
    if request.node.get_closest_marker("cpu_backend") is None:
        yield
        return
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mlx_lfm2vl.loading, "computes_on_cpu", lambda: True)
        yield
    mx.set_default_device(device)


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


_built: dict[str, Path] = {}


def fixture_checkpoint(name: str, root: Path) -> Path:
    """Path of fixture checkpoint `name`, building it on first use in this session."""
    if name not in _built:
        _built[name] = build_checkpoint(name, root / name)
    return _built[name]


@pytest.fixture(scope="session", params=sorted(FIXTURES))
def checkpoint(request, checkpoint_root) -> Path:
    """Each fixture checkpoint in turn (450M-like, 1.6B-like, LFM2.5 field variants)."""
    return fixture_checkpoint(request.param, checkpoint_root)


@pytest.fixture(scope="session")
def checkpoint_450m(checkpoint_root) -> Path:
    return fixture_checkpoint("lfm2-vl-450m", checkpoint_root)


@pytest.fixture(scope="session")
def checkpoint_16b(checkpoint_root) -> Path:
    return fixture_checkpoint("lfm2-vl-1.6b", checkpoint_root)


@pytest.fixture(scope="session")
def checkpoint_450m_real(checkpoint_root) -> Path:
    """Random weights at the real LFM2-VL-450M shapes, stored in bf16 like the published files."""
    name = "lfm2-vl-450m-real"
    if name not in _built:
        _built[name] = build_checkpoint(name, checkpoint_root / name, dtype="bfloat16")
    return _built[name]


@pytest.fixture(scope="session")
def talking_checkpoint(checkpoint_450m, tmp_path_factory) -> Path:
    """The 450M-like fixture, made to write real text: random weights mostly pick ids the small
    fixture tokenizer does not have (they decode to nothing), so the embedding rows (the tied LM
    head) of those ids and of the special tokens are zeroed. For the command-line tests, which
    compare text."""
    import shutil

    import numpy as np
    from tokenizers import Tokenizer

    embeddings = "model.language_model.embed_tokens.weight"
    folder = tmp_path_factory.mktemp("talking") / "talking"
    shutil.copytree(checkpoint_450m, folder)
    weights = mx.load(str(folder / "model.safetensors"))
    known = np.zeros(weights[embeddings].shape[0], bool)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    special = set(tokenizer.get_added_tokens_decoder())
    known[[i for i in tokenizer.get_vocab().values() if i < known.size and i not in special]] = 1
    weights[embeddings] = weights[embeddings] * mx.array(known[:, None].astype(np.float32))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    return folder


# Conversations for the fine-tuning tests: one with an image, one text-only with two answers.
CONVERSATIONS = [
    {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}],
            },
            {"role": "assistant", "content": "The cat sits on a mat."},
        ],
        "images": ["cat.png"],
    },
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "How many apples are on the table?"},
            {"role": "assistant", "content": "There are three red apples."},
            {"role": "user", "content": "Thank you!"},
            {"role": "assistant", "content": "Answer briefly and precisely."},
        ]
    },
]


@pytest.fixture(scope="session")
def conversations(tmp_path_factory) -> Path:
    """A data folder for the trainer: train.jsonl (both conversations), valid.jsonl (the text
    one) and the image they name."""
    import json

    from reference import random_image

    folder = tmp_path_factory.mktemp("conversations")
    random_image(200, 300, seed=2).save(folder / "cat.png")
    lines = [json.dumps(row) + "\n" for row in CONVERSATIONS]
    (folder / "train.jsonl").write_text("".join(lines))
    (folder / "valid.jsonl").write_text(lines[1])
    return folder


@pytest.fixture(scope="session")
def lora_adapters(checkpoint_450m, tmp_path_factory) -> Path:
    """An adapter folder for the 450M-like fixture without training: LoRA on every language
    projection with a random lora_b (at its initial zero an adapter changes nothing), saved as
    the trainer saves it."""
    from mlx_lfm2vl.loading import load_model
    from mlx_lfm2vl.lora import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        LoRALinear,
        save_json,
        save_weights,
        trained_weights,
    )
    from mlx_lfm2vl.train import TrainOptions, prepare_for_training

    model = load_model(checkpoint_450m, dtype="float32", backend=False)
    config = prepare_for_training(model, TrainOptions())
    key = mx.random.key(5)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            key, sub = mx.random.split(key)
            module.lora_b = 0.01 * mx.random.normal(module.lora_b.shape, key=sub)
    folder = tmp_path_factory.mktemp("lora_adapters")
    save_json(folder / ADAPTER_CONFIG, config)
    save_weights(folder / ADAPTER_WEIGHTS, trained_weights(model))
    return folder
