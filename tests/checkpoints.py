"""Small random-weight LFM2-VL checkpoints in the Hugging Face layout, built with the reference.

The real weights cannot be downloaded here, so every parity test runs on checkpoints that
`transformers` itself builds and saves (`save_pretrained`) from the published configs in
`tests/data/reference/`, shrunk in width and depth. What is kept is what the port's code paths
depend on: head counts and GQA ratios, the `layer_types` pattern, the patch and tile geometry, the
field spellings of each published revision, and the processor files.

The real `tokenizer.json` (4.7 MB) is not available either: `build_tokenizer` writes a byte-level
BPE tokenizer whose special tokens sit at the published ids (`<image>` = 396, tiles 397-496, ...).

Used by `tests/conftest.py` and by `benchmarks/`; importing it needs the `test` extra
(torch, transformers).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

# The published config files, kept in the repository; data/reference/SOURCES.md says where
# each came from.
REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"

# Files copied verbatim from a published checkpoint folder into a fixture checkpoint.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "generation_config.json",
)

_CORPUS = (
    "Describe this image in one sentence. What is in the picture? The cat sits on a mat. "
    "A photograph of a city street at night, with cars, people and bright shop windows. "
    "How many apples are on the table? There are three red apples and one green pear. "
    "You are a helpful assistant. Answer briefly and precisely. Thank you! Numbers: 0 1 2 3 4 5 "
    "6 7 8 9 10 42 100 2025. Punctuation: , . ; : ! ? ( ) [ ] { } - _ / \\ ' \" @ # $ % & * + = "
    "Unicode: café, naïve, Zürich, Ελληνικά, 日本語, 中文, 한국어, emoji 🙂🐈 and more text to "
    "learn merges from: the quick brown fox jumps over the lazy dog."
)


def reference_dir(name: str) -> Path:
    """Folder of one published checkpoint's config files, e.g. `reference_dir("LFM2-VL-450M")`."""
    folder = REFERENCE_DIR / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is missing: tests/data/reference is part of the repository; restore it "
            "with git checkout"
        )
    return folder


def published_special_tokens() -> dict[int, str]:
    """The special tokens of the published LFM2-VL tokenizer, by id."""
    config = json.loads((reference_dir("LFM2-VL-450M") / "tokenizer_config.json").read_text())
    return {
        int(token_id): entry["content"]
        for token_id, entry in config["added_tokens_decoder"].items()
        if entry["special"]
    }


def build_tokenizer(
    folder: Path,
    image_token_id: int = 396,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 1200,
) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json into `folder`.

    Special tokens keep their published ids. `image_token_id` moves `<image>` elsewhere (the
    LFM2.5-VL-3B layout puts it at 124907, and 396 becomes an ordinary text token). The merges
    are learned from `corpus` (texts; default a small built-in one) up to `vocab_size` learned
    tokens: a large corpus and `vocab_size=64400 - len(published_special_tokens())` give a
    tokenizer of the published size (benchmarks/bench_constrained.py).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = published_special_tokens()
    if image_token_id != 396:
        del specials[396]
        specials[image_token_id] = "<image>"

    # Learn byte-level BPE merges on a small corpus, then place the learned vocabulary in the ids
    # the special tokens leave free, so special ids are exactly the published ones.
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [_CORPUS] * 4 if corpus is None else corpus
    trainer_tokenizer.train_from_iterator(texts, trainer=trainer)
    learned = json.loads(trainer_tokenizer.to_str())["model"]
    free_ids = (i for i in range(10**7) if i not in specials)
    vocab = {
        token: next(free_ids) for token, _ in sorted(learned["vocab"].items(), key=lambda t: t[1])
    }
    vocab.update({content: token_id for token_id, content in specials.items()})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([specials[i] for i in sorted(specials)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))

    config = json.loads((reference_dir("LFM2-VL-450M") / "tokenizer_config.json").read_text())
    config.pop("auto_map", None)
    config["added_tokens_decoder"] = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token_id, content in sorted(specials.items())
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(reference_dir("LFM2-VL-450M") / "special_tokens_map.json", folder)


# How each fixture shrinks a published config. Head counts, GQA ratios, layer_types, patch size,
# position grid (num_patches) and tile geometry stay; widths and vision depth shrink.
FIXTURES = {
    # LFM2-VL-450M: no thumbnail in config.json, projector with LayerNorm (default true).
    "lfm2-vl-450m": {
        "source": "LFM2-VL-450M",
        "text": {
            "hidden_size": 256,
            "intermediate_size": 1024,
            "block_ff_dim": 1024,
            "block_dim": 256,
            "conv_dim": 256,
            "conv_dim_out": 256,
        },
        "vision": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3},
        "top": {"projector_hidden_size": 160},
    },
    # LFM2-VL-1.6B: thumbnail, several tiles; vision MLP width not a multiple of 64 (like 4304).
    "lfm2-vl-1.6b": {
        "source": "LFM2-VL-1.6B",
        "text": {
            "hidden_size": 256,
            "intermediate_size": 1536,
            "block_ff_dim": 1536,
            "block_dim": 256,
            "conv_dim": 256,
            "conv_dim_out": 256,
        },
        "vision": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 3},
        "top": {"projector_hidden_size": 192},
    },
    # LFM2.5-VL-1.6B field variants (rope_parameters, projector_use_layernorm false), plus the
    # LFM2.5-VL-3B image token id 124907 with a 128K vocabulary, and no block_dim in text_config
    # (configs written by transformers itself carry none).
    "lfm2.5-vl": {
        "source": "LFM2.5-VL-1.6B",
        "text": {
            "hidden_size": 256,
            "intermediate_size": 1536,
            "block_ff_dim": 1536,
            "vocab_size": 128000,
        },
        "drop_text": ("block_dim", "conv_dim", "conv_dim_out"),
        "vision": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2},
        "top": {"projector_hidden_size": 128, "image_token_id": 124907},
        "processor_source": "LFM2-VL-1.6B",
    },
}


# The real LFM2-VL-450M shapes, unshrunk (random weights, stored in bf16 as published).
FIXTURES_AT_REAL_SHAPES = {
    "lfm2-vl-450m-real": {"source": "LFM2-VL-450M", "text": {}, "vision": {}, "top": {}},
}


def fixture_config(name: str) -> dict:
    """The shrunk config.json dict of one fixture."""
    spec = {**FIXTURES, **FIXTURES_AT_REAL_SHAPES}[name]
    config = json.loads((reference_dir(spec["source"]) / "config.json").read_text())
    config = copy.deepcopy(config)
    config["text_config"].update(spec["text"])
    for key in spec.get("drop_text", ()):
        config["text_config"].pop(key, None)
    config["vision_config"].update(spec["vision"])
    config.update(spec["top"])
    if "image_token_index" in config:
        config["image_token_index"] = config["image_token_id"]
    return config


def build_checkpoint(name: str, folder: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Build fixture `name` with the reference implementation and save it to `folder`."""
    import torch
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    spec = {**FIXTURES, **FIXTURES_AT_REAL_SHAPES}[name]
    config = Lfm2VlConfig.from_dict(fixture_config(name))
    torch.manual_seed(seed)
    model = Lfm2VlForConditionalGeneration(config).eval()
    _randomize_norms(model, seed)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    processor_source = reference_dir(spec.get("processor_source", spec["source"]))
    for file_name in PROCESSOR_FILES:
        # Where a file was not published in a copy we could obtain, SOURCES.md gives a labelled
        # reconstruction (`name.reconstructed.ext`); a fixture uses it under the real name.
        stem, ext = file_name.rsplit(".", 1)
        for candidate in (file_name, f"{stem}.reconstructed.{ext}"):
            if (processor_source / candidate).exists():
                shutil.copy(processor_source / candidate, folder / file_name)
                break
    # Published generation configs would stop at id 7 on random weights too; keep them as they are.
    build_tokenizer(folder, image_token_id=config.image_token_id)
    return folder


def _randomize_norms(model, seed: int) -> None:
    """Give norm weights and biases non-trivial values.

    The reference initialises them to ones/zeros, which would hide a port that forgot a norm's
    scale or mixed up two norms.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                noise = torch.randn(parameter.shape, generator=generator) * 0.1
                parameter.copy_(base + noise)
