"""Make the shapes model: a small LFM2-VL trained from scratch on the shapes task.

    python -m mlx_lfm2vl.shapes.build --out shapes-model
    python -m mlx_lfm2vl.shapes.build --out shapes-model --processes 2   (both cores of a CPU)

Steps, all deterministic for a given machine, library versions and number of processes:
1. write the training, stage-1 (`warmup`) and validation data as PNG files and JSONL
   conversations;
2. write a checkpoint folder in the published Hugging Face layout with initial weights: the
   LFM2-VL architecture (the 450M's config, narrowed and made shallower, its layer pattern of
   short convolutions and attention kept), a byte-level BPE tokenizer learned on the task's
   texts with the published special tokens at their published ids, the published chat template
   and processor files with a smaller tile;
3. train the vision tower and projector alone first, with the classifiers of `probe.py`, on
   one set of kinds of question after another (`--vision-stages`);
4. train the language model with `mlx_lfm2vl.train` (full fine-tuning; the vision tower and
   projector too with `--train-vision`) on the whole task, after an optional easy stage;
5. write the trained weights into the same layout (bf16, as the published checkpoints), so
   `transformers` loads the folder as it loads LiquidAI's, and this port loads it with `load`;
6. answer the test questions with the written model and record the accuracy in `shapes.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import MODEL, task

FILES = Path(__file__).resolve().parent / "files"
MANIFEST = "shapes.json"

# The processor's geometry: 16-pixel patches, 2x2 of them per image token, 16-25 tokens for an
# image shown whole (128x128 to 160x160 pixels), and 128-pixel tiles (16 tokens each) plus a
# thumbnail for larger ones: small, so that training sees many images in its 15 minutes.
PROCESSOR = {
    "do_image_splitting": True,
    "downsample_factor": 2,
    "encoder_patch_size": 16,
    "max_image_tokens": 25,
    "max_num_patches": 100,
    "max_pixels_tolerance": 2.0,
    "max_tiles": 4,
    "min_image_tokens": 16,
    "min_tiles": 2,
    "tile_size": 128,
    "use_thumbnail": True,
}


# The default recipe (the shipped model's; docs/shapes.md, "The build", runs 22-27, wcp, cnt, A,
# t1000, pc6w12 and lp300). The vision tower and projector are first trained alone (`probe.train`,
# VISION_BATCH pictures a step): positions alone, then counts alone (after 0, 300 and 600 steps
# of counts the tower ended the stages with 79.2%, 90.6% and 96.2% of the validation positions,
# and with 1,200 steps of words 77.5% of the words after 300 of counts, 87.5% after 600: runs
# nc1100, t1000, pw12, pc6w12, one seed each), then words alone (the slowest kind: 75% of them
# after 900 steps, 84-86% after 1,200: runs t1000, pw12, pc6w12), then every kind, which the
# positions need most of 900 steps to come back in (run t900). Inside the whole model the tower
# learned colour and nothing else (runs 11-18): what the answers ask reaches it only through the
# language model, which by then reads colour alone.
# Then the language model is trained on the task with the tower frozen (TASK_ITERS): trained
# further, the tower lost the positions (run 25).
VISION_STAGES = (
    (("position",), 300),
    (("count",), 600),
    (("word",), 1200),
    (task.KINDS, 900),
)
# The language model's steps on the task. Counts are read by it slowly: from one tower, 75%,
# 82% and 92% of them after 300, 600 and 1,200 steps (runs cnt, cnt-i600, cnt-i1200), and
# words too: 67% and 77% after 800 and 1,000 steps (runs t800, t1000). With PAD_BATCH the
# vision stages' 3,000 steps leave the time for 1,000.
TASK_ITERS = 1000
VISION_BATCH = 16
# The task stage's conversations in padded passes, those of similar length together (the
# trainer's --pad-batch): a task step took 0.33 s instead of 0.40 (run p1200), and the time
# saved went to the counts' and words' stages (run pc6w12).
PAD_BATCH = True
# Half the width first tried: alone, it learned shapes as well (92%) in 1,000 steps, not 1,300.
VISION_WIDTH = 64
# Positions are learned only while they are a large share of each step: with each position
# picture drawn four times, the tower keeps them beside the other kinds; at their natural fifth
# it loses them (runs 24-25). Words, the slowest kind, drawn twice: 52% of them at the end of
# the vision stages, not 30% (runs 27-28).
VISION_REPEATS = {"position": 4, "word": 2}
# The tower resizes its 16x16 position table to each view's grid (8-10 patches a side here)
# with an antialiased filter, which averages neighbouring entries: a normal(0, 0.02) table comes
# out at a standard deviation of 0.007-0.009, ~2% of what a patch adds, and single image tokens
# did not say where they were (run 11). Smooth 2-D sines survive the resize. At full size they
# drowned the colour when the whole model learned both at once (run 13); the vision stages,
# which learn positions first, need them at full size (at 0.1, 32% of positions after 600 steps).
POSITION_TABLE_SCALE = 1.0
# The kinds whose classifiers read each picture's mean image token less the mean of the step's
# pictures (`probe.Probe`): the part every picture shares is large, and a classifier of raw means
# spends hundreds of steps learning to see past it; words alone sat at chance for 600 steps
# that way and reached 70% centred (docs/shapes.md, runs wc and wcp). Positions stay raw:
# the language model reads raw tokens, and positions read centred were not read by it.
VISION_CENTER = ("color", "shape", "count", "word")
# Steps at the start of each vision stage that fit its fresh classifiers alone, the tower frozen
# (`probe.train`'s classifier_steps), about 4 s a stage. Trained through random classifiers from
# its first step, the tower is pushed by their noise; with them fitted first, the stages mostly
# learned sooner (seed 0: counts 72.5% held out after 150 steps, not 59.5%; words 58.5% after
# 300, not 45.5%), and the whole model answered 97.2%, 94.0% and 95.0% of the test questions
# over three seeds, not 92.6%, 91.2% and 93.6% (runs lp300, lp300-s1, lp300-s2 against pc6w12
# and its seeds).
VISION_CLASSIFIER_STEPS = 300


def model_config(vocab_size: int, vision_width: int = VISION_WIDTH) -> dict:
    """config.json: LFM2-VL-450M's fields, narrower and shallower."""
    text = {
        "architectures": ["Lfm2ForCausalLM"],
        "block_auto_adjust_ff_dim": True,
        "block_dim": 128,
        "block_ff_dim": 512,
        "block_ffn_dim_multiplier": 1.0,
        "block_multiple_of": 256,
        "block_norm_eps": 1e-05,
        "conv_L_cache": 3,
        "conv_bias": False,
        "conv_dim": 128,
        "conv_dim_out": 128,
        "eos_token_id": 7,
        "hidden_size": 128,
        "initializer_range": 0.02,
        "intermediate_size": 512,
        # the 450M's last six layers: two conv blocks, then attention every other layer
        "layer_types": ["conv", "conv", "full_attention", "conv", "full_attention", "conv"],
        "max_position_embeddings": 128000,
        "model_type": "lfm2",
        "norm_eps": 1e-05,
        "num_attention_heads": 2,
        "num_heads": 2,
        "num_hidden_layers": 6,
        "num_key_value_heads": 1,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_pos_enc": True,
        "vocab_size": vocab_size,
    }
    vision = {
        "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": vision_width,
        "intermediate_size": 4 * vision_width,
        "layer_norm_eps": 1e-06,
        "model_type": "siglip2_vision_model",
        "num_attention_heads": 2,
        "num_channels": 3,
        "num_hidden_layers": 4,
        "num_patches": 256,
        "patch_size": 16,
        "vision_use_head": False,
    }
    return {
        "architectures": ["Lfm2VlForConditionalGeneration"],
        **PROCESSOR,
        "dtype": "bfloat16",
        "image_token_id": 396,
        "image_token_index": 396,
        "model_type": "lfm2_vl",
        "projector_bias": True,
        "projector_hidden_act": "gelu",
        "projector_hidden_size": 256,
        "text_config": text,
        "use_image_special_tokens": True,
        "vision_config": vision,
    }


def task_texts() -> list[str]:
    """Every text the task's conversations hold, for the tokenizer to learn its merges from."""
    words = ["user", "assistant", "What color is the shape?", "What color are the shapes?"]
    words += ["Which shape is in the picture?", "How many shapes are there?"]
    words += ["Where is the shape?", "What word is written?"]
    words += list(task.COLORS) + list(task.SHAPES) + list(task.QUADRANTS) + list(task.WORDS)
    words += [str(n) for n in range(10)]
    return words


def write_tokenizer(folder: Path) -> int:
    """tokenizer.json and its config files; returns the vocabulary size the model needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    config = json.loads((FILES / "tokenizer_config.json").read_text())
    specials = {int(i): entry["content"] for i, entry in config["added_tokens_decoder"].items()}
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = task_texts()
    learner.train_from_iterator([" ".join(texts)] * 8 + texts * 8, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    # the learned tokens take the ids after the special ones, in the order they were learned
    first = max(specials) + 1
    ordered = sorted(learned["vocab"].items(), key=lambda item: item[1])
    vocab = {token: first + rank for rank, (token, _) in enumerate(ordered)}
    vocab.update({content: token_id for token_id, content in specials.items()})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([specials[i] for i in sorted(specials)])
    tokenizer.save(str(folder / "tokenizer.json"))
    shutil.copy(FILES / "tokenizer_config.json", folder)
    shutil.copy(FILES / "special_tokens_map.json", folder)
    return vocab_size(folder)


def vocab_size(folder: Path) -> int:
    """The vocabulary size a model needs for the tokenizer in `folder`: its ids, rounded up to
    a multiple of 64 as published vocabularies are."""
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    return -(-(max(vocab.values()) + 1) // 64) * 64


def write_processor_files(folder: Path) -> None:
    shutil.copy(FILES / "chat_template.jinja", folder)
    processor = {
        "processor_class": "Lfm2VlProcessor",
        **PROCESSOR,
        "use_image_special_tokens": True,
    }
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    image_processor = {
        "image_processor_type": "Lfm2VlImageProcessorFast",
        "processor_class": "Lfm2VlProcessor",
        **PROCESSOR,
        "do_normalize": True,
        "do_rescale": True,
        "do_pad": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "patch_size": 16,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "return_row_col_info": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def hf_weights(parameters: dict[str, mx.array]) -> dict[str, mx.array]:
    """This port's parameters under the names and layouts `transformers` saves."""
    out = {}
    for name, value in parameters.items():
        if name.endswith("conv.conv.weight"):
            value = value.transpose(0, 2, 1)  # MLX depthwise (D, K, 1) -> torch (D, 1, K)
        out[f"model.{name}"] = value
    return out


def initial_parameters(
    config: dict, seed: int, position_table_scale: float = POSITION_TABLE_SCALE
) -> dict[str, mx.array]:
    """Random weights: normal(0, 0.02) matrices, embeddings and convolutions (the config's
    `initializer_range`), zero biases, unit norms, and the vision position table as 2-D sines
    (`sincos_positions`) times `position_table_scale`. (SigLIP's own, larger init of the vision
    tower trained worse here: measured in docs/shapes.md.)"""
    from ..config import ModelConfig
    from ..models.lfm2_vl import Lfm2VlModel

    model = Lfm2VlModel(ModelConfig.from_dict(config))
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in sorted(tree_flatten(model.parameters())):
        if "norm" in name and name.endswith("weight"):
            array = np.ones(value.shape)
        elif name.endswith("bias"):
            array = np.zeros(value.shape)
        elif name.endswith("embeddings.position_embedding.weight"):
            array = position_table_scale * sincos_positions(*value.shape)
        else:
            array = rng.normal(0.0, 0.02, value.shape)
        out[name] = mx.array(array.astype(np.float32))
    return out


def sincos_positions(count: int, width: int) -> np.ndarray:
    """A square table of `count` positions (row-major), `width` values each: sines and cosines
    of the row in the first half, of the column in the second, at geometrically spaced
    frequencies (MAE's fixed 2-D embedding)."""
    side = int(round(count**0.5))
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, columns = np.divmod(np.arange(side * side), side)
    parts = []
    for coordinate in (rows, columns):
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [np.sin(angles), np.cos(angles)]
    return np.concatenate(parts, axis=1)


def write_checkpoint(folder: Path, parameters: dict[str, mx.array], dtype: mx.Dtype, config):
    """Weights, config, tokenizer and processor files of one checkpoint in the HF layout."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(dtype) for k, v in hf_weights(parameters).items()}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    config = {**config, "dtype": {mx.bfloat16: "bfloat16", mx.float32: "float32"}[dtype]}
    config["text_config"] = {**config["text_config"], "dtype": config["dtype"]}
    config["vision_config"] = {**config["vision_config"], "dtype": config["dtype"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_processor_files(folder)


def build(
    out: Path,
    work: Path,
    train_examples: int = 12000,
    iters: int = TASK_ITERS,
    warmup_iters: int = 0,
    batch_size: int = 16,
    vision_stages: Sequence[tuple[Sequence[str], int]] = VISION_STAGES,
    vision_width: int = VISION_WIDTH,
    vision_repeats: Mapping[str, int] | None = VISION_REPEATS,
    position_table_scale: float = POSITION_TABLE_SCALE,
    vision_center: Sequence[str] = VISION_CENTER,
    vision_classifier_steps: int = VISION_CLASSIFIER_STEPS,
    train_vision: bool = False,
    learning_rate: float = 1e-3,
    seed: int = 0,
    pad_batch: bool = PAD_BATCH,
    test_examples: int = 500,
    valid_examples: int = 200,
    log=print,
) -> dict | None:
    """Make the shapes model in `out` (replaced only when complete), working in `work`.

    Under `mlx.launch` every process runs this, with one `work` folder that all of them see:
    each step's examples are shared out among the processes (`probe.train`, `mlx_lfm2vl.train`)
    and the first process writes the files and the model, and returns the manifest; the
    others return None.

    First the vision stages, (kinds, steps) pairs: the vision tower (`vision_width` wide) and
    the projector are trained alone (`probe.train`), on each pair's kinds of question for its
    steps, one pair after another, drawing the pictures of a kind in `vision_repeats` that many
    times as often. Alone, the tower learns shapes and positions that it does not learn inside
    the whole model (the defaults and why: VISION_STAGES above).

    Then the trainer's stages, full training with `mlx_lfm2vl.train` of the language model
    (and of the tower and projector with `train_vision`): `warmup_iters` steps on the easy
    "warmup" split (lone shapes, large or in a quadrant, and words), then `iters` steps on the
    whole task. The easy stage is for a tower trained from scratch inside the whole model,
    without vision stages (docs/shapes.md, runs 11-14): started on the whole task, such a model
    sits for hundreds of steps on answers it guesses from the question alone. It is skipped at
    0 steps (the default).
    """
    if iters < 1:
        raise ValueError("iters must be at least 1: the model is trained on the whole task")
    check_out(out)  # first: a build is 15 minutes, and a folder of something else is kept
    began = time.perf_counter()
    group = mx.distributed.init()
    first = group.rank() == 0
    if not first:
        log = _silent
    data, easy = work / "data", work / "warmup-data"
    initial = work / "initial"
    if first:
        log(
            f"writing {train_examples} training, {warmup_iters * batch_size} warm-up and "
            f"{valid_examples} validation examples under {work}"
        )
        task.write_split(data, "train", train_examples, every_question=True)
        task.write_split(data, "valid", valid_examples)
        if warmup_iters:
            task.write_split(easy, "warmup", warmup_iters * batch_size, every_question=True)
            os.replace(easy / "warmup.jsonl", easy / "train.jsonl")  # the trainer's file names
            task.write_split(easy, "valid", valid_examples)
        initial.mkdir(parents=True, exist_ok=True)
        write_tokenizer(initial)
    _wait_for_all(group)
    config = model_config(vocab_size(initial), vision_width)
    parameters = initial_parameters(config, seed, position_table_scale)
    vision_record = []
    for kinds, steps in vision_stages:
        from . import probe

        log(f"vision stage: {steps} steps of {VISION_BATCH} pictures on {', '.join(kinds)}")
        trained, history = probe.train(
            config, parameters, kinds, steps, VISION_BATCH, learning_rate,
            train_pictures=train_examples, valid_pictures=valid_examples,
            report_every=max(steps // 4, 1), seed=seed,
            log=lambda line: log(f"vision {line} ({time.perf_counter() - began:.0f} s)"),
            repeats=vision_repeats, group=group, center=vision_center,
            classifier_steps=vision_classifier_steps,
        )  # fmt: skip
        parameters = {**parameters, **trained}
        vision_record.append({"kinds": list(kinds), "steps": steps, "validation": history})
    if first:
        write_checkpoint(initial, parameters, mx.float32, config)
    _wait_for_all(group)
    stages = []
    start = initial
    for name, stage_data, stage_iters, schedule in (
        ("warm-up", easy, warmup_iters, "constant"),
        ("task", data, iters, "cosine"),
    ):
        if stage_iters == 0:
            continue

        def stage_log(line: str, name: str = name) -> None:
            log(f"{name} {line} ({time.perf_counter() - began:.0f} s)")

        result, parameters = _train_stage(
            start, stage_data, work / name, stage_iters, batch_size, learning_rate, schedule,
            train_vision, seed, pad_batch, stage_log,
        )  # fmt: skip
        stages.append((name, result))
        start = work / f"{name}-model"
        if first:
            write_checkpoint(start, parameters, mx.float32, config)
            _copy_tokenizer(initial, start)
        _wait_for_all(group)

    if not first:
        return None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_checkpoint(tmp, parameters, mx.bfloat16, config)
        _copy_tokenizer(initial, tmp)
        from .. import load
        from .evaluate import accuracy

        model, processor = load(tmp)
        scores = accuracy(model, processor, "test", test_examples)
        manifest = {
            "test_exact_match": scores.exact_match,
            "test_questions": test_examples,
            "test_by_kind": scores.by_kind(),
            "train_examples": train_examples,
            "warmup_iters": warmup_iters,
            "iters": iters,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "seed": seed,
            "processes": group.size(),
            "vision_stages": vision_record,
            "vision_width": vision_width,
            "vision_center": list(vision_center),
            "vision_classifier_steps": vision_classifier_steps,
            "vision_repeats": dict(vision_repeats or {}),
            "position_table_scale": position_table_scale,
            "train_vision": train_vision,
            "pad_batch": pad_batch,
            "first_losses": stages[0][1].losses[:5],
            "last_loss": stages[-1][1].losses[-1],
            "validation": {name: stage.validation for name, stage in stages},
            "seconds": round(time.perf_counter() - began),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"test exact match {scores.exact_match:.1%} ({scores.by_kind()}); wrote {out}")
    return manifest


def _train_stage(
    start, data, run, iters, batch_size, learning_rate, schedule, train_vision, seed, pad_batch,
    log,
):  # fmt: skip
    """Train every weight of the checkpoint `start` (the vision tower and projector only with
    `train_vision`); returns the result and the new weights."""
    from ..loading import load_model
    from ..train import TrainOptions, TrainReport, ValidationReport, train

    def progress(report) -> None:
        if isinstance(report, TrainReport):
            line = f"step {report.step}/{iters}: loss {report.loss:.4f}"
            log(f"{line}, {report.tokens_per_second:.0f} tokens/s")
        elif isinstance(report, ValidationReport):
            log(f"step {report.step}: validation loss {report.loss:.4f}")

    options = TrainOptions(
        iters=iters,
        batch_size=batch_size,
        learning_rate=learning_rate,
        lr_schedule=schedule,
        warmup=min(100, iters // 10),
        grad_clip=1.0,
        full=True,
        train_vision=train_vision,
        seed=seed,
        pad_batch=pad_batch,
        val_every=max(iters // 4, 1),
        save_every=max(iters // 4, 1),
        report_every=50,
    )
    result = train(start, data, run, options, progress)
    _wait_for_all(mx.distributed.init())  # the first process has written the weights
    model = load_model(start, dtype=mx.float32, adapter_path=run, backend=False)
    return result, dict(tree_flatten(model.parameters()))


def check_out(out: Path) -> None:
    """Refuse an output folder that holds something other than a shapes model."""
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ValueError(
            f"{out} exists and holds something other than a shapes model: choose --out"
        )


def _silent(line: str) -> None:
    pass


def _wait_for_all(group: mx.distributed.Group) -> None:
    """Return when every process of `group` has called this (at once for one process)."""
    from ..batch_cli import all_sum_ints

    all_sum_ints(group, [1])


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, target / name)


def vision_stage(text: str) -> tuple[tuple[str, ...], int]:
    """ "shape,count:800" -> (("shape", "count"), 800); "all" is every kind."""
    from .probe import KINDS

    kinds, _, steps = text.rpartition(":")
    named = KINDS if kinds == "all" else tuple(k for k in kinds.split(",") if k)
    unknown = sorted(set(named) - set(KINDS))
    if not named or unknown or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KINDS:STEPS, with KINDS 'all' or some of {','.join(KINDS)} "
            "and STEPS at least 1 (e.g. shape:800)"
        )
    return named, int(steps)


def stages_text(stages: Sequence[tuple[Sequence[str], int]]) -> str:
    """The command-line form of `stages`: ((("word",), 600), (KINDS, 900)) -> "word:600 all:900"."""
    return " ".join(
        f"{'all' if tuple(kinds) == task.KINDS else ','.join(kinds)}:{steps}"
        for kinds, steps in stages
    )


def vision_repeat(text: str) -> tuple[str, int]:
    """ "position:4" -> ("position", 4)."""
    from .probe import KINDS

    kind, _, times = text.rpartition(":")
    if kind not in KINDS or not times.isdigit() or int(times) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KIND:TIMES, with KIND one of {','.join(KINDS)} "
            "and TIMES at least 1 (e.g. position:4)"
        )
    return kind, int(times)


def repeats_text(repeats: Mapping[str, int]) -> str:
    """The command-line form of `repeats`: {"position": 4, "word": 2} -> "position:4 word:2"."""
    return " ".join(f"{kind}:{times}" for kind, times in repeats.items())


# MLX's CPU backend computes a training step on one core (OpenBLAS's second thread gains a few
# percent), so on a 2-core CPU two processes of half a step each build in less time: 677 s
# against 799 s for run 28's recipe (docs/shapes.md, "Two processes"). Two is the default: the
# shipped model was built so, and the order of the sums changes the weights.
PROCESSES = 2


def launch(processes: int, arguments: Sequence[str], work: Path) -> int:
    """Run this build with `arguments` in `processes` processes on this machine, joined by MLX's
    ring backend over 127.0.0.1 (the environment `mlx.launch` sets: MLX_RANK, MLX_HOSTFILE);
    returns the first failing process's exit status, or 0. A process that fails stops the
    others, which would otherwise wait for it forever. (`mlx.launch` itself is not used: it
    polls its processes' output without pausing, and on two cores that takes one from them.)"""
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    hostfile = work / "hosts.json"
    first = free_ports(processes)
    hosts = [[f"127.0.0.1:{port}"] for port in range(first, first + processes)]
    hostfile.write_text(json.dumps(hosts))
    # One BLAS thread a process: two processes on two cores otherwise spin against each other.
    environment = {**os.environ, "MLX_HOSTFILE": str(hostfile), "OPENBLAS_NUM_THREADS": "1"}
    command = [sys.executable, "-m", __spec__.name, *arguments]
    running = [
        subprocess.Popen(command, env={**environment, "MLX_RANK": str(rank)})
        for rank in range(processes)
    ]
    try:
        while True:
            codes = [process.poll() for process in running]
            failed = [code for code in codes if code not in (None, 0)]
            if failed or all(code == 0 for code in codes):
                return failed[0] if failed else 0
            time.sleep(0.5)
    finally:
        for process in running:
            if process.poll() is None:
                process.terminate()
                process.wait()


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1, one for each process."""
    import random
    import socket

    for _ in range(100):
        start = random.randrange(20000, 60000)
        sockets = []
        try:
            for port in range(start, start + count):
                sockets.append(socket.socket())
                sockets[-1].bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for taken in sockets:
                taken.close()
    raise OSError(f"no {count} consecutive free ports on 127.0.0.1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(MODEL), help="model folder (default: %(default)s)")
    parser.add_argument("--work", help="folder for the data and the run (default: a temporary one)")
    parser.add_argument("--train-examples", type=int, default=12000, help="pictures for stage 2")
    parser.add_argument(
        "--vision-stages",
        nargs="*",
        default=VISION_STAGES,
        type=vision_stage,
        metavar="KINDS:STEPS",
        help=f"vision stages, in order (default: {stages_text(VISION_STAGES)}; "
        "none if given without any)",
    )
    parser.add_argument(
        "--vision-width", type=int, default=VISION_WIDTH, help="the tower's width (%(default)s)"
    )
    parser.add_argument(
        "--vision-repeats",
        nargs="*",
        default=list(VISION_REPEATS.items()),
        type=vision_repeat,
        metavar="KIND:TIMES",
        help="the vision stages draw the pictures of KIND TIMES as often "
        f"(default: {repeats_text(VISION_REPEATS)}; none if given without any)",
    )
    parser.add_argument(
        "--position-table-scale",
        type=float,
        default=POSITION_TABLE_SCALE,
        help="size of the vision tower's initial position table (default: %(default)s)",
    )
    parser.add_argument(
        "--train-vision",
        action="store_true",
        help="train the vision tower and projector in the task stages too (default: they stay "
        "as the vision stages left them)",
    )
    parser.add_argument(
        "--vision-center",
        nargs="*",
        default=list(VISION_CENTER),
        choices=task.KINDS,
        metavar="KIND",
        help="kinds whose classifiers in the vision stages read each picture's mean less the "
        "step's (default: %(default)s; none if given without any)",
    )
    parser.add_argument(
        "--vision-classifier-steps",
        type=int,
        default=VISION_CLASSIFIER_STEPS,
        help="steps at the start of each vision stage that fit its classifiers alone, the tower "
        "frozen (default: %(default)s)",
    )
    parser.add_argument("--warmup-iters", type=int, default=0, help="steps of the easy stage")
    parser.add_argument(
        "--iters", type=int, default=TASK_ITERS, help="steps on the whole task (%(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="conversations a step")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak rate")
    parser.add_argument("--seed", type=int, default=0, help="data order and initial weights")
    parser.add_argument(
        "--pad-batch",
        action=argparse.BooleanOptionalAction,
        default=PAD_BATCH,
        help="the task stage computes a step's conversations in padded passes, those of similar "
        "length together (the trainer's --pad-batch): faster, another order of the sums",
    )
    parser.add_argument(
        "--valid-examples", type=int, default=200, help="validation examples (%(default)s)"
    )
    parser.add_argument(
        "--test-examples", type=int, default=500, help="test questions answered (%(default)s)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=PROCESSES,
        help="processes on this machine that share each training step: 2 on a 2-core CPU "
        "builds in about 0.85x the time, another model of the same recipe (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    for name in ("train_examples", "iters", "batch_size", "valid_examples", "test_examples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup_iters < 0:
        parser.error("--warmup-iters must be 0 (none) or more")
    if args.vision_classifier_steps < 0:
        parser.error("--vision-classifier-steps must be 0 (none) or more")
    if args.vision_width < 2 or args.vision_width % 2:
        parser.error("--vision-width must be an even number: the tower has two attention heads")
    if not 1 <= args.processes <= args.batch_size:
        parser.error("--processes must be at least 1 and at most --batch-size")
    launched = mx.distributed.init().size() > 1
    if launched and not args.work:
        parser.error("under mlx.launch, pass --work: a folder every process sees")
    out = Path(args.out).expanduser().resolve()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work).expanduser() if args.work else Path(scratch)
        if args.processes > 1 and not launched:
            try:
                check_out(out)  # here, not once in every process
            except ValueError as error:
                parser.exit(2, f"error: {error}\n")
            arguments = sys.argv[1:] if argv is None else list(argv)
            try:
                sys.exit(launch(args.processes, [*arguments, "--work", str(work.resolve())], work))
            except OSError as error:  # no ports, or the processes could not be started
                parser.exit(2, f"error: {error}: try --processes 1\n")
        try:
            build(
                out,
                work,
                train_examples=args.train_examples,
                iters=args.iters,
                warmup_iters=args.warmup_iters,
                batch_size=args.batch_size,
                vision_stages=tuple((tuple(kinds), steps) for kinds, steps in args.vision_stages),
                vision_width=args.vision_width,
                vision_repeats=dict(args.vision_repeats),
                position_table_scale=args.position_table_scale,
                vision_center=tuple(args.vision_center),
                vision_classifier_steps=args.vision_classifier_steps,
                train_vision=args.train_vision,
                learning_rate=args.learning_rate,
                seed=args.seed,
                pad_batch=args.pad_batch,
                test_examples=args.test_examples,
                valid_examples=args.valid_examples,
                log=lambda line: print(line, file=sys.stderr, flush=True),
            )
        except ValueError as error:
            parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    from .. import relaunch_with_fast_blas

    relaunch_with_fast_blas()  # on Linux: OpenBLAS preloaded, or float32 matmuls are ~50x slower
    main()
