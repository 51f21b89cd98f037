"""Fine-tuning: LoRA (the default), QLoRA on a quantized model, or every weight (`full`).

    python -m mlx_lfm2vl.lora --model M --data DIR --adapter-path OUT [--iters N] ...
    mlx.launch -n 2 -- python -m mlx_lfm2vl.lora ...      (data parallel, one process per rank)

Data. DIR holds `train.jsonl` and, for validation, `valid.jsonl`: one conversation a line,
`{"messages": [...], "images": ["a.jpg", ...]}`, the messages in the form the processor takes
(`{"role": ..., "content": str | [{"type": "image"}, {"type": "text", "text": ...}]}`), one
`images` path (relative to the JSONL file's folder, or absolute) per image item, in order.

Loss. The mean cross-entropy of the assistant's tokens, and only those: the chat template decides
which they are. For each assistant message i, the conversation's first i messages are rendered
with the generation prompt (what the model sees when asked to answer) and the first i + 1 without
it; the characters between the two renderings, the answer and the template's end-of-turn text
(`<|im_end|>` and its newline for LFM2-VL), are the assistant's. A token is the assistant's when
it begins there. Every assistant token of a step's batch weighs the same.

Step. Each example runs alone (a prompt with images is one row) and its gradients are summed;
the sum over the batch, divided by its assistant tokens, is the step's gradient. Under
`mlx.launch` each process takes its share of every batch and the sums are added across processes
(`mx.distributed`), so N processes compute the loss and gradients of the whole batch, as one
process would. The shares are of about equal work (`shares`, by `tokens_estimate`): every
process waits for the slowest at each step. The optimizer is AdamW with bias correction
(torch's AdamW); weight decay 0 by default, which makes it Adam.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .errors import Lfm2VlError
from .image_processor import ImageProcessorSettings, plan_image
from .lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    apply_lora,
    lora_targets,
    read_adapter_config,
    save_json,
    save_weights,
    trained_weights,
)
from .models.lfm2_vl import Lfm2VlModel
from .processor import Processor

TRAINING_STATE = "training_state.json"

# Options that change what a resumed run computes: they must be those of the run it continues.
_RUN_OPTIONS = (
    "batch_size",
    "learning_rate",
    "lr_schedule",
    "warmup",
    "grad_clip",
    "pad_batch",
    "weight_decay",
    "lora_rank",
    "lora_scale",
    "lora_dropout",
    "lora_layers",
    "train_vision",
    "full",
    "seed",
    "dtype",
    "image_options",
)


@dataclass(frozen=True)
class TrainOptions:
    """How to train; the defaults are the command line's (mlx-lm's where it has the option)."""

    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"  # or "cosine": down to 1% of learning_rate at the last step
    warmup: int = 0  # steps of linear warm-up from 1% of learning_rate
    grad_clip: float = 0.0  # largest global gradient norm (0: no clipping)
    weight_decay: float = 0.0
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_dropout: float = 0.0
    lora_layers: tuple[str, ...] | None = None  # projection names; None: all of them
    train_vision: bool = False  # also the vision tower and the projector
    full: bool = False  # every weight of the trained parts instead of LoRA
    val_every: int = 200  # steps between validations (0: none); also at the start and end
    save_every: int = 100  # steps between saved adapters (0: only at the end)
    report_every: int = 10  # steps per training-loss report
    resume: bool = False
    grad_checkpoint: bool = False  # recompute layer activations in the backward pass
    pad_batch: bool = False  # a step's conversations in padded passes (more memory)
    seed: int = 0
    dtype: str = "float32"
    image_options: dict[str, Any] = field(default_factory=dict)  # max_image_tokens, ...


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, Any]]
    images: list[Path]
    where: str  # "file:line", for errors


@dataclass(frozen=True)
class Encoded:
    """One example as the model takes it, with the positions whose next token is trained."""

    input_ids: mx.array  # (1, L) int32
    pixel_values: mx.array | None
    spatial_shapes: mx.array | None
    positions: mx.array  # (T,) positions whose logits predict an assistant token
    targets: mx.array  # (T,) those tokens


def read_examples(file: Path) -> list[Example]:
    """The conversations of one JSONL file; a malformed line is an error naming file and line."""
    try:
        lines = file.read_bytes().splitlines()
    except OSError as e:
        raise Lfm2VlError(f"cannot read {file} ({e.strerror or e})") from None
    examples = []
    for number, raw in enumerate(lines, start=1):
        where = f"{file}:{number}"
        try:
            line = raw.decode("utf-8")
            row = json.loads(line) if line.strip() else None
        except (UnicodeDecodeError, ValueError) as e:
            raise Lfm2VlError(
                f"{where}: not a JSON line ({e}); each line must be one conversation "
                '{"messages": [...], "images": [...]}'
            ) from None
        if row is not None:
            examples.append(_example(row, file.parent, where))
    if not examples:
        raise Lfm2VlError(f"{file} holds no conversation: write one JSON object a line")
    return examples


def _example(row: Any, folder: Path, where: str) -> Example:
    def fail(message: str) -> Lfm2VlError:
        return Lfm2VlError(f"{where}: {message}")

    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise fail('expected {"messages": [...], "images": [...]} (a "messages" list)')
    unknown = sorted(set(row) - {"messages", "images"})
    if unknown:
        raise fail(f'unknown key(s) {", ".join(unknown)}; a line has "messages" and "images"')
    messages = row["messages"]
    images = row.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise fail('"images" must be a list of image paths')
    markers = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise fail(f'message {i} is not a {{"role": ..., "content": ...}} object')
        content = message.get("content")
        items = content if isinstance(content, list) else []
        n = sum(1 for item in items if isinstance(item, dict) and item.get("type") == "image")
        if n and message["role"] == "assistant":
            raise fail(f"message {i}: images go in user messages, not the assistant's")
        markers += n
    if not any(m.get("role") == "assistant" for m in messages):
        raise fail("no assistant message: the loss trains on the assistant's answers")
    if messages[0].get("role") == "assistant":
        raise fail("the conversation starts with the assistant: start with a user message")
    if markers != len(images):
        raise fail(
            f'{markers} image item(s) in the messages but {len(images)} path(s) in "images": '
            "give one path per image item, in order"
        )
    paths = [folder / Path(p).expanduser() for p in images]
    for path in paths:
        if not path.is_file():
            raise fail(f"image {path} not found (paths are relative to the JSONL file's folder)")
    return Example(messages, paths, where)


def read_dataset(data: str | Path) -> tuple[list[Example], list[Example]]:
    """The training and validation conversations of a data folder (validation may be empty)."""
    folder = Path(data).expanduser()
    if not (folder / "train.jsonl").is_file():
        raise Lfm2VlError(
            f"{folder / 'train.jsonl'} not found: --data is a folder with train.jsonl (and "
            "valid.jsonl for validation)"
        )
    train = read_examples(folder / "train.jsonl")
    valid_file = folder / "valid.jsonl"
    return train, read_examples(valid_file) if valid_file.is_file() else []


def assistant_spans(
    processor: Processor, messages: Sequence[dict[str, Any]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character ranges of the assistant's turns (the rule in
    the module docstring)."""
    text = processor.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        asked = processor.apply_chat_template(messages[:i], add_generation_prompt=True)
        answered = processor.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (answered.startswith(asked) and text.startswith(answered)):
            raise Lfm2VlError(
                f"the chat template renders message {i} differently once later messages follow: "
                "the assistant's text cannot be found by rendering prefixes"
            )
        if len(answered) > len(asked):
            spans.append((len(asked), len(answered)))
    return text, spans


def encode(
    processor: Processor, example: Example, image_options: dict[str, Any] | None = None
) -> Encoded:
    """Input ids, pixels and the trained positions of one conversation."""
    try:
        text, spans = assistant_spans(processor, example.messages)
        processed = processor.encode(text, example.images, spans=spans, **(image_options or {}))
    except Lfm2VlError as e:
        raise Lfm2VlError(f"{example.where}: {e}") from None
    trained = processed.in_spans[1:] if spans else np.zeros(0, bool)
    if not trained.any():
        raise Lfm2VlError(f"{example.where}: the assistant's messages are empty")
    ids = processed.input_ids
    inputs = processed.model_inputs
    return Encoded(
        inputs["input_ids"],
        inputs.get("pixel_values"),
        inputs.get("spatial_shapes"),
        mx.array(np.flatnonzero(trained), mx.int32),
        mx.array(ids[1:][trained], mx.int32),
    )


def shares(costs: Sequence[float], processes: int) -> list[list[int]]:
    """The indices of `costs` shared among `processes` so that each one's total is about the
    same (under `mlx.launch` every process waits for the slowest at each step, and a tiled
    image costs several small ones): largest first, each to the least loaded process. With
    positive costs the first `processes` items go one to each; one process gets them all, in
    order."""
    loads = [0.0] * processes
    out: list[list[int]] = [[] for _ in range(processes)]
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        process = min(range(processes), key=lambda p: loads[p])
        out[process].append(index)
        loads[process] += costs[index]
    return [sorted(indices) for indices in out]


def tokens_estimate(example: Example, settings: ImageProcessorSettings) -> float:
    """About how many tokens the model reads for `example`, without encoding it: its images'
    tokens as the processor will lay them out (sizes from the files' headers) and a token for
    every four characters of its text. What `shares` weighs a step's examples by."""
    from PIL import Image

    pixels_per_token = (settings.encoder_patch_size * settings.downsample_factor) ** 2
    tokens = len(json.dumps(example.messages)) / 4
    for path in example.images:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, ValueError):  # encode() says what is wrong with it
            continue
        views = plan_image(height, width, settings).view_shapes
        tokens += sum(h * w for h, w in views) / pixels_per_token
    return tokens


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The examples of step `step` (0-based): a new shuffle of the data each epoch, a function
    of the seed and the step alone, so a resumed run sees the batches an uninterrupted one
    would."""
    indices = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n)
        indices.append(int(_permutation(seed, epoch, n)[i]))
    return indices


# ------------------------------------------------------------------------------------------
# Loss and gradients
# ------------------------------------------------------------------------------------------


def loss_sum(model: Lfm2VlModel, example: Encoded) -> mx.array:
    """Summed cross-entropy of an example's assistant tokens. The LM head runs only on the
    positions that predict one."""
    embeddings = model.get_input_embeddings(
        example.input_ids, example.pixel_values, example.spatial_shapes
    )
    hidden = model.language_model(embeddings)
    logits = model.lm_head_logits(hidden[0, example.positions]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, example.targets, reduction="sum")


def padded_loss_sum(model: Lfm2VlModel, examples: Sequence[Encoded]) -> mx.array:
    """`loss_sum` of several examples added up, computed in one pass: every view of every
    image through the vision tower at once (views of one grid as one batch), then the token
    sequences right-padded into one (B, L) batch. The language model is causal in its attention
    and its convolutions alike, so padding after a sequence changes none of its positions."""
    features = None
    with_images = [e for e in examples if e.pixel_values is not None]
    if with_images:
        features = model.get_image_features(
            mx.concatenate([e.pixel_values for e in with_images]),
            mx.concatenate([e.spatial_shapes for e in with_images]),
        )
    image_token = model.config.image_token_id
    rows, used = [], 0
    for example in examples:
        if example.pixel_values is None:
            rows.append(model.get_input_embeddings(example.input_ids))
            continue
        n = int((np.asarray(example.input_ids) == image_token).sum())
        mine = features[used : used + n]
        rows.append(model.get_input_embeddings(example.input_ids, image_features=mine))
        used += n
    length = max(row.shape[1] for row in rows)
    batch = mx.concatenate(
        [mx.pad(row, [(0, 0), (0, length - row.shape[1]), (0, 0)]) for row in rows]
    )
    hidden = model.language_model(batch)
    total = mx.array(0.0)
    for i, example in enumerate(examples):
        logits = model.lm_head_logits(hidden[i, example.positions]).astype(mx.float32)
        total = total + nn.losses.cross_entropy(logits, example.targets, reduction="sum")
    return total


# A padded pass takes conversations whose lengths are within this ratio of each other: one pass
# over a whole step of mixed lengths (single views and tiled images) spends what it saves in
# dispatch on padding. Measured on the shapes model's task stage (2-core CPU, one process, 8
# conversations of 30-161 tokens a step, forward and backward): 33 ms a conversation one at a
# time, 32 in one pass, 26 within a ratio of 1.2, 25 within 1.4, 27 within 1.7.
PAD_LENGTH_RATIO = 1.4


def length_groups(lengths: Sequence[int], ratio: float | None = None) -> list[list[int]]:
    """The indices of `lengths` in groups of similar length for padded passes: sorted by
    length, a new group begun wherever a length exceeds `ratio` (by default PAD_LENGTH_RATIO)
    times its group's first."""
    ratio = PAD_LENGTH_RATIO if ratio is None else ratio
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if not groups or lengths[index] > ratio * lengths[groups[-1][0]]:
            groups.append([])
        groups[-1].append(index)
    return groups


@dataclass(frozen=True)
class BatchGradients:
    loss: float  # mean over the batch's assistant tokens, all processes
    trained_tokens: int  # assistant tokens of the batch, all processes
    tokens: int  # input tokens (text and image) of the batch, all processes
    gradients: dict


def batch_gradients(
    model: Lfm2VlModel, examples: Sequence[Encoded], group: Any = None, padded: bool = False
) -> BatchGradients:
    """Loss and gradients of a batch (this process's share of it under `mlx.launch`: the sums
    are added across `group`): each example alone, one at a time, or with `padded` in padded
    passes (`padded_loss_sum`) of examples of similar length (`length_groups`)."""
    group = group or mx.distributed.init()
    total = None
    summed = mx.array(0.0)
    if padded:
        lengths = [e.input_ids.size for e in examples]
        passes = [[examples[i] for i in indices] for indices in length_groups(lengths)]
        value_and_grad = nn.value_and_grad(model, padded_loss_sum)
    else:
        passes = list(examples)
        value_and_grad = nn.value_and_grad(model, loss_sum)
    for one_pass in passes:
        loss, gradients = value_and_grad(model, one_pass)
        total = gradients if total is None else tree_map(mx.add, total, gradients)
        summed = summed + loss
        mx.eval(total, summed)  # one pass's graph at a time
    if total is None:  # a process without examples in this batch still adds its share
        total = tree_map(mx.zeros_like, model.trainable_parameters())
    counts = [
        summed,
        mx.array(float(sum(e.targets.size for e in examples))),
        mx.array(float(sum(e.input_ids.size for e in examples))),
    ]
    counts = mx.stack(counts)
    if group.size() > 1:
        counts = mx.distributed.all_sum(counts, group=group)
        # average_gradients gathers small arrays into few messages; it divides by the size.
        total = tree_map(lambda g: g * group.size(), nn.average_gradients(total, group=group))
    summed, trained, tokens = counts.tolist()
    scale = 1.0 / trained
    total = tree_map(lambda g: g * scale, total)
    return BatchGradients(summed / trained, int(trained), int(tokens), total)


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(options: TrainOptions) -> float | Callable[[mx.array], mx.array]:
    """The learning rate, or a schedule of it over the optimizer's steps: an optional linear
    warm-up, then constant or cosine decay to 1% of the rate at `iters`."""
    if options.lr_schedule not in LR_SCHEDULES:
        raise Lfm2VlError(
            f"lr_schedule {options.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}"
        )
    peak = options.learning_rate
    if options.lr_schedule == "constant" and options.warmup == 0:
        return peak
    steps = max(options.iters - options.warmup, 1)
    if options.lr_schedule == "cosine":
        after = optim.cosine_decay(peak, steps, end=peak * 0.01)
    else:
        after = optim.linear_schedule(peak, peak, steps)
    if options.warmup == 0:
        return after
    warm = optim.linear_schedule(peak * 0.01, peak, options.warmup)
    return optim.join_schedules([warm, after], [options.warmup])


def make_optimizer(options: TrainOptions) -> optim.Optimizer:
    """AdamW with bias correction, as torch's (MLX's own default leaves it out)."""
    return optim.AdamW(
        learning_rate=learning_rate(options),
        weight_decay=options.weight_decay,
        bias_correction=True,
    )


def train_step(
    model: Lfm2VlModel,
    optimizer: optim.Optimizer,
    examples: Sequence[Encoded],
    group: Any = None,
    grad_clip: float = 0.0,
    padded: bool = False,
) -> BatchGradients:
    """One optimizer step on a batch (its gradients first scaled down to a global norm of at
    most `grad_clip`, when set); returns its loss and counts. `padded`: see `batch_gradients`."""
    result = batch_gradients(model, examples, group, padded)
    gradients = result.gradients
    if grad_clip > 0:
        gradients, _ = optim.clip_grad_norm(gradients, grad_clip)
    optimizer.update(model, gradients)
    mx.eval(model.trainable_parameters(), optimizer.state)
    return result


def evaluate(
    model: Lfm2VlModel,
    processor: Processor,
    examples: Sequence[Example],
    image_options: dict[str, Any] | None = None,
    group: Any = None,
) -> tuple[float, int]:
    """Mean loss over the assistant tokens of `examples` and their count (each process takes
    every size-th example; the sums are added)."""
    group = group or mx.distributed.init()
    summed, trained = 0.0, 0
    for example in examples[group.rank() :: group.size()]:
        encoded = encode(processor, example, image_options)
        summed += loss_sum(model, encoded).item()
        trained += encoded.targets.size
    counts = mx.array([summed, float(trained)])
    if group.size() > 1:
        counts = mx.distributed.all_sum(counts, group=group)
    summed, trained = counts.tolist()
    return summed / trained, int(trained)


# ------------------------------------------------------------------------------------------
# Model preparation
# ------------------------------------------------------------------------------------------


@cache
def _checkpointed(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of a layer class whose call keeps only its inputs for the backward pass and
    computes the rest again there (`mx.checkpoint`)."""

    def __call__(self, *args, **kwargs):
        def run(parameters, *args, **kwargs):
            self.update(parameters)
            return cls.__call__(self, *args, **kwargs)

        return mx.checkpoint(run)(self.trainable_parameters(), *args, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})


def grad_checkpoint(model: Lfm2VlModel) -> None:
    """Recompute each decoder and vision encoder layer's activations in the backward pass: the
    memory of a step holds one layer's activations instead of every layer's, for one more
    forward pass of compute. The layers keep their parameters and names (their class becomes a
    subclass with a checkpointed call)."""
    for layer in [*model.language_model.layers, *model.vision_tower.encoder.layers]:
        layer.__class__ = _checkpointed(type(layer))


def prepare_for_training(model: Lfm2VlModel, options: TrainOptions) -> dict[str, Any]:
    """Freeze the model, then make trainable what `options` asks (in place); returns the
    adapter config that describes it."""
    model.freeze()
    config: dict[str, Any] = {"train_vision": options.train_vision}
    if options.full:
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise Lfm2VlError(
                "full fine-tuning needs a float model: train LoRA on a quantized one (QLoRA), or "
                "pass the float checkpoint"
            )
        parts = [model.language_model] + ([model["lm_head"]] if "lm_head" in model else [])
        if options.train_vision:
            parts += [model.vision_tower, model.multi_modal_projector]
        for part in parts:
            part.unfreeze()
        config["fine_tune_type"] = "full"
    else:
        paths = lora_targets(model, options.lora_layers, options.train_vision)
        apply_lora(
            model, paths, options.lora_rank, options.lora_scale, options.lora_dropout, options.seed
        )
        config.update(
            fine_tune_type="lora",
            rank=options.lora_rank,
            scale=options.lora_scale,
            dropout=options.lora_dropout,
            modules=paths,
        )
    if options.grad_checkpoint:
        grad_checkpoint(model)
    return config


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartReport:
    trainable_parameters: int
    parameters: int
    train_examples: int
    valid_examples: int
    processes: int
    start_step: int  # 0, or the step a resumed run continues from


@dataclass(frozen=True)
class TrainReport:
    step: int
    loss: float  # mean over the assistant tokens of the steps since the last report
    trained_tokens: int  # assistant tokens of those steps
    tokens_per_second: float  # input tokens (text and image) of those steps, all processes
    peak_memory: float  # GB: MLX's peak allocation of this process (not reset by the library)


@dataclass(frozen=True)
class ValidationReport:
    step: int
    loss: float
    trained_tokens: int
    seconds: float


@dataclass(frozen=True)
class SaveReport:
    step: int
    path: Path


Report = StartReport | TrainReport | ValidationReport | SaveReport


@dataclass(frozen=True)
class TrainResult:
    adapter_path: Path
    step: int  # steps done, counting those of a resumed run
    losses: list[float]  # the training loss of each step this call ran
    validation: list[tuple[int, float]]  # (step, loss)
    seconds: float


def _run_options(options: TrainOptions) -> dict[str, Any]:
    values = asdict(options)
    return json.loads(json.dumps({k: values[k] for k in _RUN_OPTIONS}))


def _restore(tree: Any, flat: dict[str, mx.array]) -> None:
    """Put saved leaves into a nested tree of dicts and lists, by their dotted names."""
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(leaf) if isinstance(node, list) else leaf] = value


def _check_folder(folder: Path, resume: bool) -> dict[str, Any] | None:
    """The saved state of a run to resume, or None for a new run (into a folder without one)."""
    state_file = folder / TRAINING_STATE
    if not resume:
        if state_file.exists() or (folder / ADAPTER_WEIGHTS).exists():
            raise Lfm2VlError(
                f"{folder} already holds adapters: pass --resume to continue that run, or "
                "another --adapter-path"
            )
        if folder.exists() and not folder.is_dir():
            raise Lfm2VlError(f"--adapter-path {folder} is a file: pass a folder")
        return None
    try:
        state = json.loads(state_file.read_text())
        int(state["step"]), str(state["optimizer"]), dict(state["options"])
    except (OSError, ValueError, KeyError, TypeError):
        raise Lfm2VlError(
            f"nothing to resume in {folder} ({TRAINING_STATE} is missing or damaged): drop "
            "--resume to start a new run"
        ) from None
    return state


def train(
    model: str | Path,
    data: str | Path,
    adapter_path: str | Path,
    options: TrainOptions | None = None,
    progress: Callable[[Report], None] | None = None,
) -> TrainResult:
    """Fine-tune the checkpoint `model` on the conversations in `data` (a folder with
    train.jsonl and valid.jsonl) and write adapters to `adapter_path`: `adapter_config.json`,
    `adapters.safetensors` (the latest), `NNNNNNN_adapters.safetensors` at each save, and
    `training_state.json` with the optimizer state a `resume` continues from.

    `progress` receives a `Report` at the start, every `report_every` steps, at each validation
    and save (on the first process only under `mlx.launch`). The library prints nothing.
    """
    from .loading import load_model, resolve_model_path

    options = options or TrainOptions()
    start_time = time.perf_counter()
    for name in ("iters", "batch_size", "report_every"):
        if getattr(options, name) < 1:
            raise Lfm2VlError(f"{name.replace('_', '-')} must be at least 1")
    for name in ("val_every", "save_every", "warmup"):
        if getattr(options, name) < 0:
            raise Lfm2VlError(f"{name.replace('_', '-')} must be 0 (never) or more")
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    folder = Path(adapter_path).expanduser()
    state = _check_folder(folder, options.resume)
    if state is not None and state["options"] != _run_options(options):
        changed = sorted(
            k for k, v in _run_options(options).items() if state["options"].get(k) != v
        )
        raise Lfm2VlError(
            f"--resume continues a run with other options ({', '.join(changed)} differ): "
            "pass the options of that run"
        )
    train_set, valid_set = read_dataset(data)

    folder_of_model = resolve_model_path(model)
    processor = Processor.from_pretrained(folder_of_model)
    image_settings = processor.image_processor.settings.replace(**options.image_options)
    for example in train_set + valid_set:  # template errors now, not at some later step
        try:
            assistant_spans(processor, example.messages)
        except Lfm2VlError as e:
            raise Lfm2VlError(f"{example.where}: {e}") from None
    net = load_model(folder_of_model, dtype=options.dtype, backend=False)
    adapter_config = prepare_for_training(net, options)
    adapter_config["model"] = str(model)
    optimizer = make_optimizer(options)
    step = 0
    if state is not None:
        saved = read_adapter_config(folder)
        if {k: v for k, v in saved.items() if k != "model"} != {
            k: v for k, v in adapter_config.items() if k != "model"
        }:
            raise Lfm2VlError(f"{folder / ADAPTER_CONFIG} does not describe this run's adapters")
        step = int(state["step"])
        weights = mx.load(str(folder / f"{step:07d}_adapters.safetensors"))
        net.load_weights(list(weights.items()), strict=False)
        optimizer.init(net.trainable_parameters())
        saved_state = mx.load(str(folder / state["optimizer"]))
        if set(saved_state) != {k for k, _ in tree_flatten(optimizer.state)}:
            raise Lfm2VlError(f"{folder / state['optimizer']} does not fit this run")
        _restore(optimizer.state, saved_state)
    elif rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_json(folder / ADAPTER_CONFIG, adapter_config)
    mx.eval(net.parameters(), optimizer.state)

    def report(item: Report) -> None:
        if progress is not None and rank == 0:
            progress(item)

    def save(at: int) -> None:
        if rank != 0:
            return
        weights = trained_weights(net)
        path = folder / f"{at:07d}_adapters.safetensors"
        save_weights(path, weights)
        save_weights(folder / ADAPTER_WEIGHTS, weights)
        optimizer_file = f"optimizer-{at:07d}.safetensors"
        save_weights(folder / optimizer_file, dict(tree_flatten(optimizer.state)))
        previous = _check_folder(folder, resume=True) if (folder / TRAINING_STATE).exists() else {}
        save_json(
            folder / TRAINING_STATE,
            {"step": at, "optimizer": optimizer_file, "options": _run_options(options)},
        )
        if previous.get("optimizer") not in (None, optimizer_file):
            (folder / previous["optimizer"]).unlink(missing_ok=True)
        report(SaveReport(at, path))

    validation = []

    def validate(at: int) -> None:
        if not valid_set or options.val_every == 0:
            return
        began = time.perf_counter()
        net.eval()
        loss, trained = evaluate(net, processor, valid_set, options.image_options, group)
        net.train()
        validation.append((at, loss))
        report(ValidationReport(at, loss, trained, time.perf_counter() - began))

    trainable = sum(v.size for _, v in tree_flatten(net.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(net.parameters()))
    report(StartReport(trainable, total, len(train_set), len(valid_set), size, step))
    if step == 0:
        validate(0)
    net.train()
    losses = []
    window = [0.0, 0, 0, time.perf_counter()]  # loss sum, trained tokens, tokens, start
    while step < options.iters:
        if options.lora_dropout > 0:
            mx.random.seed(options.seed * 1_000_003 + step)  # a resumed run drops the same
        indices = batch_indices(step, options.batch_size, len(train_set), options.seed)
        if size > 1:
            costs = [tokens_estimate(train_set[i], image_settings) for i in indices]
            indices = [indices[i] for i in shares(costs, size)[rank]]
        mine = indices
        batch = [encode(processor, train_set[i], options.image_options) for i in mine]
        result = train_step(net, optimizer, batch, group, options.grad_clip, options.pad_batch)
        step += 1
        losses.append(result.loss)
        window[0] += result.loss * result.trained_tokens
        window[1] += result.trained_tokens
        window[2] += result.tokens
        if step % options.report_every == 0 or step == options.iters:
            seconds = time.perf_counter() - window[3]
            report(
                TrainReport(
                    step,
                    window[0] / window[1],
                    window[1],
                    window[2] / seconds,
                    mx.get_peak_memory() / 1e9,
                )
            )
            window = [0.0, 0, 0, time.perf_counter()]
        if options.val_every and step % options.val_every == 0 and step != options.iters:
            validate(step)
        if options.save_every and step % options.save_every == 0 and step != options.iters:
            save(step)
    if losses or state is None:
        validate(step)
        save(step)
    return TrainResult(folder, step, losses, validation, time.perf_counter() - start_time)


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def _format(report: Report, iters: int) -> str:
    if isinstance(report, StartReport):
        share = 100 * report.trainable_parameters / max(report.parameters, 1)
        lines = [
            f"trainable parameters: {report.trainable_parameters / 1e6:.3f}M "
            f"({share:.3f}% of {report.parameters / 1e6:.1f}M)",
            f"examples: {report.train_examples} training, {report.valid_examples} validation"
            + (f"; {report.processes} processes" if report.processes > 1 else ""),
        ]
        if report.start_step:
            lines.append(f"resuming at step {report.start_step}")
        return "\n".join(lines)
    head = f"step {report.step}/{iters}"
    if isinstance(report, TrainReport):
        return (
            f"{head}: train loss {report.loss:.4f}, {report.tokens_per_second:.1f} tokens/s, "
            f"{report.trained_tokens} trained tokens, peak memory {report.peak_memory:.3f} GB"
        )
    if isinstance(report, ValidationReport):
        return (
            f"{head}: validation loss {report.loss:.4f} ({report.trained_tokens} tokens, "
            f"{report.seconds:.1f} s)"
        )
    return f"{head}: saved {report.path}"


def _cli():
    import click

    from .cli_options import command, image_options, image_settings

    defaults = TrainOptions()

    @command()
    @click.option(
        "--model", required=True, help="Checkpoint folder or hub id (float or quantized)."
    )
    @click.option(
        "--data",
        required=True,
        type=click.Path(path_type=Path),
        help="Folder with train.jsonl (and valid.jsonl): one "
        '{"messages": [...], "images": [...]} conversation a line.',
    )
    @click.option(
        "--adapter-path",
        default="adapters",
        show_default=True,
        type=click.Path(path_type=Path),
        help="Folder the adapters (and the state --resume needs) are written to.",
    )
    @click.option("--iters", type=click.IntRange(min=1), default=defaults.iters, show_default=True)
    @click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=defaults.batch_size,
        show_default=True,
        help="Conversations per step (over all processes under mlx.launch).",
    )
    @click.option(
        "--learning-rate",
        type=click.FloatRange(min=0, min_open=True),
        default=defaults.learning_rate,
        show_default=True,
    )
    @click.option(
        "--lr-schedule",
        type=click.Choice(LR_SCHEDULES),
        default=defaults.lr_schedule,
        show_default=True,
        help="cosine: decay to 1% of --learning-rate at the last step.",
    )
    @click.option(
        "--warmup",
        type=click.IntRange(min=0),
        default=defaults.warmup,
        show_default=True,
        help="Steps of linear warm-up from 1% of --learning-rate.",
    )
    @click.option(
        "--grad-clip",
        type=click.FloatRange(min=0),
        default=defaults.grad_clip,
        show_default=True,
        help="Scale each step's gradients down to this global norm at most (0: never).",
    )
    @click.option(
        "--weight-decay",
        type=click.FloatRange(min=0),
        default=defaults.weight_decay,
        show_default=True,
        help="AdamW's decoupled weight decay.",
    )
    @click.option(
        "--lora-rank", type=click.IntRange(min=1), default=defaults.lora_rank, show_default=True
    )
    @click.option(
        "--lora-scale",
        type=float,
        default=defaults.lora_scale,
        show_default=True,
        help="Multiplies the low-rank update (alpha / rank in PEFT's terms).",
    )
    @click.option(
        "--lora-dropout",
        type=click.FloatRange(0, 1, max_open=True),
        default=defaults.lora_dropout,
        show_default=True,
    )
    @click.option(
        "--lora-layers",
        default=None,
        help="Comma-separated projection names to adapt (default: all): q_proj, k_proj, v_proj, "
        "out_proj, in_proj, w1, w2, w3 in the language model; with --train-vision also fc1, "
        "fc2 (vision) and linear_1, linear_2 (projector).",
    )
    @click.option(
        "--train-vision",
        is_flag=True,
        help="Also train the vision tower and the projector (LoRA, or all weights with --full).",
    )
    @click.option(
        "--full",
        is_flag=True,
        help="Train every weight of the language model (and with --train-vision of the vision "
        "side) instead of LoRA; needs a float model.",
    )
    @click.option(
        "--val-every",
        type=click.IntRange(min=0),
        default=defaults.val_every,
        show_default=True,
        help="Steps between validation losses (also at the start and the end; 0: never).",
    )
    @click.option(
        "--save-every",
        type=click.IntRange(min=0),
        default=defaults.save_every,
        show_default=True,
        help="Steps between saved adapters (also at the end).",
    )
    @click.option(
        "--report-every",
        type=click.IntRange(min=1),
        default=defaults.report_every,
        show_default=True,
        help="Steps per training-loss line.",
    )
    @click.option(
        "--resume", is_flag=True, help="Continue the run saved in --adapter-path from its step."
    )
    @click.option(
        "--grad-checkpoint",
        is_flag=True,
        help="Recompute layer activations in the backward pass: less memory, more compute.",
    )
    @click.option(
        "--pad-batch",
        is_flag=True,
        help="Compute a step's conversations in padded passes, those of similar length "
        "together, instead of one at a time: same gradients, more memory, faster.",
    )
    @click.option("--seed", type=click.IntRange(min=0), default=defaults.seed, show_default=True)
    @click.option(
        "--dtype",
        type=click.Choice(["float32", "bfloat16", "float16"]),
        default=defaults.dtype,
        show_default=True,
        help="Compute dtype of the model's float weights.",
    )
    @image_options()
    def cli(
        model,
        data,
        adapter_path,
        lora_layers,
        min_image_tokens,
        max_image_tokens,
        no_image_splitting,
        **values,
    ):
        """Fine-tune an LFM2-VL model on conversations (LoRA by default, QLoRA on a quantized
        model, or --full); the loss counts the assistant's tokens only.

        \b
        Examples:
          python -m mlx_lfm2vl.lora --model LiquidAI/LFM2-VL-450M --data data/ --iters 600
          mlx.launch -n 2 -- python -m mlx_lfm2vl.lora --model M --data data/ --batch-size 8
        """
        processing = image_settings(min_image_tokens, max_image_tokens, no_image_splitting)
        layers = None
        if lora_layers is not None:
            layers = tuple(name.strip() for name in lora_layers.split(",") if name.strip())
        options = TrainOptions(lora_layers=layers, image_options=processing, **values)
        mx.reset_peak_memory()
        result = train(
            model,
            data,
            adapter_path,
            options,
            lambda report: click.echo(_format(report, options.iters)),
        )
        if mx.distributed.init().rank() == 0:
            click.echo(f"done: {result.step} steps, adapters in {result.adapter_path}")

    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (arguments from `sys.argv` when None); returns the exit code. User
    errors print one line on stderr."""
    from .cli_options import run_command

    interrupted = "interrupted: rerun with --resume to continue from the last save"
    return run_command(_cli(), argv, "python -m mlx_lfm2vl.lora", interrupted)


def run() -> None:
    """The program (`python -m mlx_lfm2vl.lora`, the `mlx-lfm2vl-lora` script): on Linux it
    first relaunches itself with a fast BLAS preloaded (`cpu.blas`); apps call `main()` or
    `train()`."""
    from . import relaunch_with_fast_blas

    relaunch_with_fast_blas()
    sys.exit(main())


if __name__ == "__main__":
    # Run the package's copy of this module, not this second `__main__` copy.
    from mlx_lfm2vl.train import run

    run()
