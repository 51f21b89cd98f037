"""Fine-tuning (mlx_lfm2vl/train.py): the loss and gradients against the reference's (torch
autograd through `Lfm2VlForConditionalGeneration`, LoRA built by hand in torch), one AdamW step,
the loss mask, data errors, resume, and two processes under `mlx.launch`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from cli_checks import REPO, environment, launch
from conftest import CONVERSATIONS
from mlx.utils import tree_flatten
from PIL import Image
from reference import reference_processor

from mlx_lfm2vl import Lfm2VlError
from mlx_lfm2vl.loading import hf_to_mlx_name, load_model
from mlx_lfm2vl.lora import LoRALinear
from mlx_lfm2vl.processor import Processor
from mlx_lfm2vl.train import (
    Example,
    TrainOptions,
    encode,
    learning_rate,
    length_groups,
    make_optimizer,
    prepare_for_training,
    read_dataset,
    shares,
    tokens_estimate,
    train,
    train_step,
)

# Relative to the largest reference value of each compared tensor.
TOLERANCE = 1e-4


def examples(folder: Path) -> list[Example]:
    return read_dataset(folder)[0]


def assert_close(actual: mx.array, expected: torch.Tensor, what: str) -> float:
    expected = expected.detach().numpy()
    error = float(np.abs(np.asarray(actual) - expected).max())
    scale = float(np.abs(expected).max())
    assert error <= TOLERANCE * max(scale, 1e-6), f"{what}: error {error:.3g}, scale {scale:.3g}"
    return error / max(scale, 1e-30)


def assert_same_step(
    actual: mx.array,
    expected: torch.Tensor,
    gradient: mx.array,
    expected_gradient: torch.Tensor,
    learning_rate: float,
    what: str,
) -> None:
    """The weights after one AdamW step from the same weights. The first step moves a weight by
    lr * g / (|g| + eps) (plus the decay, lr * wd * w): about lr whatever the gradient's size, so
    where |g| is near eps (1e-8) float32 noise in g moves the weight by a visible part of lr.
    Each weight may differ by what the two gradients' normalized values differ by, plus lr / 1000
    and two float32 roundings of the weight: a step without bias correction (3.2 lr), without
    the decay (lr * wd * w) or not taken at all differs by far more."""
    eps = 1e-8
    g, h = np.asarray(gradient), expected_gradient.detach().numpy()
    expected = expected.detach().numpy()
    allowed = learning_rate * (np.abs(g / (np.abs(g) + eps) - h / (np.abs(h) + eps)) + 1e-3)
    allowed += 2 * np.spacing(np.abs(expected))
    excess = np.abs(np.asarray(actual) - expected) - allowed
    assert excess.max() <= 0, f"{what}: differs by {excess.max():.3g} more than allowed"


# ------------------------------------------------------------------------------------------
# The reference: the same loss through transformers, with torch autograd
# ------------------------------------------------------------------------------------------


class TorchLoRA(torch.nn.Module):
    """y = base(x) + scale * (x @ a) @ b, as LoRALinear computes it."""

    def __init__(self, base: torch.nn.Module, a: np.ndarray, b: np.ndarray, scale: float):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.from_numpy(np.array(a)))
        self.b = torch.nn.Parameter(torch.from_numpy(np.array(b)))
        self.scale = scale

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.a) @ self.b


def fresh_reference(folder: Path):
    from transformers import Lfm2VlForConditionalGeneration

    return Lfm2VlForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def port_name(torch_name: str) -> str:
    return hf_to_mlx_name(torch_name + ".weight").removesuffix(".weight")


def reference_loss(folder: Path, reference, batch: list[Example], processor: Processor):
    """Mean cross-entropy over the assistant tokens of `batch`, computed by the reference from
    the reference processor's inputs (whose ids must equal the port's)."""
    summed, count = 0.0, 0
    for example in batch:
        encoded = encode(processor, example)
        text = processor.apply_chat_template(example.messages, add_generation_prompt=False)
        images = [Image.open(p).convert("RGB") for p in example.images] or None
        inputs = reference_processor(folder)(images=images, text=text, return_tensors="pt")
        ids = np.asarray(encoded.input_ids[0])
        assert np.array_equal(inputs["input_ids"][0].numpy(), ids)
        logits = reference(**inputs).logits[0]
        positions = torch.from_numpy(np.asarray(encoded.positions).astype(np.int64))
        targets = torch.from_numpy(np.asarray(encoded.targets).astype(np.int64))
        summed = summed + torch.nn.functional.cross_entropy(
            logits[positions], targets, reduction="sum"
        )
        count += targets.numel()
    return summed / count


def test_lora_loss_gradients_and_adamw_step_match_the_reference(checkpoint_450m, conversations):
    """LoRA on the language model, the vision tower and the projector (an image example and a
    text one in the batch): the loss, the gradient of every LoRA matrix and the weights after
    one AdamW step equal torch's on the same LoRA built by hand."""
    processor = Processor.from_pretrained(checkpoint_450m)
    batch = examples(conversations)
    options = TrainOptions(train_vision=True, learning_rate=1e-3, weight_decay=0.1)
    model = load_model(checkpoint_450m, dtype="float32", backend=False)
    prepare_for_training(model, options)
    # A trained-looking lora_b: at its initial zero, every lora_a gradient would be zero.
    key = mx.random.key(3)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            key, sub = mx.random.split(key)
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape, key=sub)
    mx.eval(model.parameters())

    reference = fresh_reference(checkpoint_450m)
    reference.requires_grad_(False)
    modules = dict(model.named_modules())
    torch_lora = {}
    for name, module in list(reference.named_modules()):
        lora = modules.get(port_name(name)) if name else None
        if isinstance(lora, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            wrapped = TorchLoRA(module, lora.lora_a, lora.lora_b, lora.scale)
            setattr(reference.get_submodule(parent_name), child, wrapped)
            torch_lora[port_name(name)] = wrapped
    assert len(torch_lora) == sum(isinstance(m, LoRALinear) for m in modules.values())
    assert any(p.startswith("vision_tower.") for p in torch_lora)
    assert "multi_modal_projector.linear_1" in torch_lora

    expected_loss = reference_loss(checkpoint_450m, reference, batch, processor)
    expected_loss.backward()
    optimizer = torch.optim.AdamW(
        [p for m in torch_lora.values() for p in (m.a, m.b)], lr=1e-3, weight_decay=0.1
    )
    optimizer.step()

    result = train_step(model, make_optimizer(options), [encode(processor, e) for e in batch])
    assert abs(result.loss - expected_loss.item()) <= 1e-5 * expected_loss.item()
    gradients = dict(tree_flatten(result.gradients))
    new_weights = dict(tree_flatten(model.trainable_parameters()))
    assert len(gradients) == 2 * len(torch_lora)
    for path, wrapped in torch_lora.items():
        for name, expected in (("lora_a", wrapped.a), ("lora_b", wrapped.b)):
            gradient = gradients[f"{path}.{name}"]
            assert_close(gradient, expected.grad, f"{path}.{name} gradient")
            new = new_weights[f"{path}.{name}"]
            assert_same_step(new, expected, gradient, expected.grad, 1e-3, f"{path}.{name}")


@pytest.mark.parametrize("padded", [False, True], ids=["one-by-one", "padded"])
def test_full_fine_tune_gradients_and_adamw_step_match_the_reference(
    checkpoint_450m, conversations, padded, monkeypatch
):
    """Every weight trained (--full --train-vision): the loss, every gradient (the tied
    embedding gets both its uses) and every weight after one AdamW step equal torch's, with the
    batch's conversations one at a time or in one padded pass (--pad-batch, its length groups
    widened to take both conversations, whose lengths differ)."""
    monkeypatch.setattr("mlx_lfm2vl.train.PAD_LENGTH_RATIO", float("inf"))
    processor = Processor.from_pretrained(checkpoint_450m)
    batch = examples(conversations)
    options = TrainOptions(full=True, train_vision=True, learning_rate=1e-4, weight_decay=0.01)
    model = load_model(checkpoint_450m, dtype="float32", backend=False)
    prepare_for_training(model, options)

    reference = fresh_reference(checkpoint_450m)
    expected_loss = reference_loss(checkpoint_450m, reference, batch, processor)
    expected_loss.backward()
    parameters = {
        port_name(name.removesuffix(".weight").removesuffix(".bias")) + name[name.rfind(".") :]: p
        for name, p in reference.named_parameters()
    }
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-4, weight_decay=0.01)
    optimizer.step()

    encoded = [encode(processor, e) for e in batch]
    assert len({e.input_ids.size for e in encoded}) == len(encoded)  # padding is exercised
    assert length_groups([e.input_ids.size for e in encoded]) == [[1, 0]]  # in one pass
    result = train_step(model, make_optimizer(options), encoded, padded=padded)
    assert abs(result.loss - expected_loss.item()) <= 1e-5 * expected_loss.item()
    gradients = dict(tree_flatten(result.gradients))
    new_weights = dict(tree_flatten(model.trainable_parameters()))
    assert gradients.keys() == {k for k, _ in tree_flatten(model.parameters())}
    largest = max(float(p.grad.abs().max()) for p in parameters.values())
    for name, gradient in gradients.items():
        expected = parameters[name]
        grad, weight = expected.grad, expected
        if name.endswith("conv.conv.weight"):  # torch (D, 1, K), MLX (D, K, 1)
            grad, weight = grad.transpose(1, 2), weight.transpose(1, 2)
        if name.endswith("self_attn.k_proj.bias"):
            # A key bias shifts every score of a query alike, which the softmax ignores: its
            # gradient is zero, and both sides compute float32 noise (~1e-9) instead.
            noise = max(float(mx.abs(gradient).max()), float(grad.abs().max()))
            assert noise <= 1e-7 * largest, f"{name} gradient: {noise:.3g}, not ~0"
        else:
            assert_close(gradient, grad, f"{name} gradient")
        assert_same_step(new_weights[name], weight, gradient, grad, 1e-4, name)


# ------------------------------------------------------------------------------------------
# Data and the loss mask
# ------------------------------------------------------------------------------------------


def test_learning_rate_schedules():
    peak = 1e-3
    constant = TrainOptions(learning_rate=peak)
    assert learning_rate(constant) == peak
    cosine = TrainOptions(learning_rate=peak, iters=110, warmup=10, lr_schedule="cosine")
    schedule = learning_rate(cosine)
    at = {step: schedule(mx.array(step)).item() for step in (0, 5, 10, 60, 110)}
    assert at[0] == pytest.approx(peak * 0.01)
    assert at[5] == pytest.approx(peak * 0.505)
    assert at[10] == pytest.approx(peak)
    assert at[60] == pytest.approx(peak * 0.505)  # half way down the cosine
    assert at[110] == pytest.approx(peak * 0.01)
    warm = learning_rate(TrainOptions(learning_rate=peak, iters=110, warmup=10))
    assert warm(mx.array(5)).item() == pytest.approx(peak * 0.505)
    assert warm(mx.array(100)).item() == pytest.approx(peak)
    with pytest.raises(Lfm2VlError, match="lr_schedule 'linear' is not one of constant, cosine"):
        learning_rate(TrainOptions(lr_schedule="linear"))


def test_gradient_clipping_bounds_the_step(checkpoint_450m, conversations):
    """AdamW's update ignores the gradient's scale until the gradient is as small as its
    epsilon: clipped to a norm of 1e-12, a step barely moves the weights."""
    processor = Processor.from_pretrained(checkpoint_450m)
    encoded = [encode(processor, e) for e in examples(conversations)]
    options = TrainOptions(full=True, learning_rate=1e-3)
    moved = {}
    for clip in (0.0, 1e-12):
        model = load_model(checkpoint_450m, dtype="float32", backend=False)
        prepare_for_training(model, options)
        before = dict(tree_flatten(model.trainable_parameters()))
        train_step(model, make_optimizer(options), encoded, grad_clip=clip)
        after = dict(tree_flatten(model.trainable_parameters()))
        moved[clip] = max(float(mx.abs(after[k] - before[k]).max()) for k in before)
    assert moved[0.0] > 5e-4
    assert moved[1e-12] < 1e-6


def test_loss_counts_each_answer_and_its_end_of_turn_only(checkpoint_450m, conversations):
    processor = Processor.from_pretrained(checkpoint_450m)
    image_example, text_example = examples(conversations)
    trained = processor.decode(np.asarray(encode(processor, text_example).targets))
    assert trained == (
        "There are three red apples.<|im_end|>\nAnswer briefly and precisely.<|im_end|>\n"
    )
    encoded = encode(processor, image_example)
    assert processor.decode(np.asarray(encoded.targets)) == "The cat sits on a mat.<|im_end|>\n"
    # Every trained position predicts its next token, and no image token is ever a target.
    ids = np.asarray(encoded.input_ids[0])
    assert np.array_equal(ids[np.asarray(encoded.positions) + 1], np.asarray(encoded.targets))
    assert processor.image_token_id not in np.asarray(encoded.targets)
    assert encoded.pixel_values is not None


BAD_LINES = {
    "not json": ("{nope", "not a JSON line"),
    "no messages": ('{"conversation": []}', 'a "messages" list'),
    "no assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    "image count": (
        '{"messages": [{"role": "user", "content": [{"type": "image"}]}, '
        '{"role": "assistant", "content": "a"}]}',
        "1 image item(s) in the messages but 0 path(s)",
    ),
    "missing image": (
        '{"messages": [{"role": "user", "content": [{"type": "image"}]}, '
        '{"role": "assistant", "content": "a"}], "images": ["gone.png"]}',
        "gone.png not found",
    ),
    "unknown key": (
        '{"messages": [{"role": "assistant", "content": "a"}], "extra": 1}',
        "unknown key(s) extra",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_malformed_line_is_an_error_naming_file_and_line(tmp_path, case):
    line, message = BAD_LINES[case]
    good = json.dumps(CONVERSATIONS[1])
    (tmp_path / "train.jsonl").write_text(f"{good}\n\n{line}\n")
    with pytest.raises(Lfm2VlError) as error:
        read_dataset(tmp_path)
    assert f"{tmp_path / 'train.jsonl'}:3: " in str(error.value)
    assert message in str(error.value)


def test_missing_data_and_unknown_lora_layers_are_user_errors(checkpoint_450m, tmp_path):
    with pytest.raises(Lfm2VlError, match="train.jsonl not found"):
        read_dataset(tmp_path)
    model = load_model(checkpoint_450m, backend=False)
    with pytest.raises(Lfm2VlError, match="unknown LoRA layer name"):
        prepare_for_training(model, TrainOptions(lora_layers=("q_proj", "gate")))


# ------------------------------------------------------------------------------------------
# The loop: resume, checkpointing, validation
# ------------------------------------------------------------------------------------------


def adapters(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def test_resumed_run_equals_an_uninterrupted_one(checkpoint_450m, conversations, tmp_path):
    """Two steps, then --resume to four (optimizer state and data order restored): the same
    losses and adapters as four steps in one go. With gradient checkpointing, the same too."""
    options = TrainOptions(
        iters=4, batch_size=1, learning_rate=1e-3, val_every=0, save_every=2, report_every=1
    )
    whole = train(checkpoint_450m, conversations, tmp_path / "whole", options)
    first = train(checkpoint_450m, conversations, tmp_path / "parts", replace(options, iters=2))
    reports = []
    rest = train(
        checkpoint_450m,
        conversations,
        tmp_path / "parts",
        replace(options, resume=True),
        reports.append,
    )
    assert reports[0].start_step == 2 and rest.step == 4
    assert np.allclose(first.losses + rest.losses, whole.losses, rtol=1e-6, atol=0)
    a, b = adapters(tmp_path / "whole"), adapters(tmp_path / "parts")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-7) for k in a)
    # Saved steps and one optimizer state (the latest) stay in the folder.
    names = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert names == [
        "0000002_adapters.safetensors",
        "0000004_adapters.safetensors",
        "adapter_config.json",
        "adapters.safetensors",
        "optimizer-0000004.safetensors",
        "training_state.json",
    ]

    checkpointed = train(
        checkpoint_450m,
        conversations,
        tmp_path / "checkpointed",
        replace(options, grad_checkpoint=True),
    )
    assert np.allclose(checkpointed.losses, whole.losses, rtol=1e-5)


def test_resume_refuses_other_options_and_a_new_run_refuses_a_used_folder(
    checkpoint_450m, conversations, tmp_path
):
    options = TrainOptions(iters=1, batch_size=1, val_every=0)
    train(checkpoint_450m, conversations, tmp_path / "run", options)
    with pytest.raises(Lfm2VlError, match="already holds adapters: pass --resume"):
        train(checkpoint_450m, conversations, tmp_path / "run", options)
    with pytest.raises(Lfm2VlError, match="lora_rank differ"):
        changed = TrainOptions(iters=2, batch_size=1, val_every=0, lora_rank=4, resume=True)
        train(checkpoint_450m, conversations, tmp_path / "run", changed)
    with pytest.raises(Lfm2VlError, match="nothing to resume"):
        train(checkpoint_450m, conversations, tmp_path / "new", TrainOptions(resume=True))


def test_reports_validation_at_start_and_end_and_lowers_the_loss(
    checkpoint_450m, conversations, tmp_path
):
    reports = []
    options = TrainOptions(iters=6, batch_size=2, learning_rate=1e-3, val_every=3, save_every=0)
    result = train(checkpoint_450m, conversations, tmp_path / "out", options, reports.append)
    assert [step for step, _ in result.validation] == [0, 3, 6]
    assert result.validation[-1][1] < result.validation[0][1]
    assert result.losses[-1] < result.losses[0]
    kinds = [type(r).__name__ for r in reports]
    assert kinds[0] == "StartReport" and kinds[-1] == "SaveReport"
    train_reports = [r for r in reports if type(r).__name__ == "TrainReport"]
    assert [r.step for r in train_reports] == [6]  # report_every 10 > iters: the end
    assert train_reports[0].tokens_per_second > 0 and train_reports[0].peak_memory > 0


# ------------------------------------------------------------------------------------------
# The command line, one process and two
# ------------------------------------------------------------------------------------------


def run_cli(*args, module: str = "mlx_lfm2vl.lora") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(OPENBLAS_NUM_THREADS="1"),
        cwd=REPO,
    )


def test_cli_errors_are_one_line(checkpoint_450m, tmp_path):
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n')
    for args, needle in (
        (["--data", tmp_path / "none"], "train.jsonl not found"),
        (["--data", tmp_path], "train.jsonl:1: no assistant message"),
    ):
        result = run_cli("--model", checkpoint_450m, "--adapter-path", tmp_path / "a", *args)
        assert result.returncode == 1 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def loss_lines(output: str) -> list[float]:
    return [float(m) for m in re.findall(r"train loss ([0-9.]+)", output)]


def test_two_processes_under_mlx_launch_equal_one_on_the_whole_batch(
    checkpoint_450m, conversations, tmp_path
):
    """Each process takes one conversation of a batch of two; the sums are added across them:
    the losses and the adapters are those of one process on the whole batch."""
    common = ["--model", checkpoint_450m, "--data", conversations, "--iters", 3]
    common += ["--batch-size", 2, "--learning-rate", 1e-3, "--report-every", 1, "--val-every", 0]
    single = run_cli(*common, "--adapter-path", tmp_path / "single")
    assert single.returncode == 0, single.stderr

    two = launch("mlx_lfm2vl.lora", 2, *common, "--adapter-path", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    assert "2 processes" in two.stdout
    expected = loss_lines(single.stdout)
    assert len(expected) == 3 and expected[-1] < expected[0]
    assert np.allclose(loss_lines(two.stdout), expected, atol=2e-4)
    a, b = adapters(tmp_path / "single"), adapters(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:
        assert np.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


def test_processes_share_a_batch_by_its_work():
    # two tiled pictures (five views each) and six single views: one tiled picture each
    costs = [5, 1, 1, 5, 1, 1, 1, 1]
    two = shares(costs, 2)
    assert sorted(two[0] + two[1]) == list(range(8))
    assert [sum(costs[i] for i in share) for share in two] == [8, 8]
    assert {0, 3} - set(two[0]) and {0, 3} - set(two[1])
    assert shares(costs, 1) == [list(range(8))]  # one process: the batch as drawn
    assert shares([2, 2], 2) == [[0], [1]]


def test_padded_passes_group_conversations_of_similar_length():
    """--pad-batch pads a step's conversations in groups: sorted by length, each group's longest
    within the ratio of its shortest, every conversation in exactly one group."""
    lengths = [40, 161, 52, 100, 41, 55, 120, 90]
    groups = length_groups(lengths, ratio=1.4)
    assert groups == [[0, 4, 2, 5], [7, 3, 6], [1]]
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert max(lengths[i] for i in group) <= 1.4 * min(lengths[i] for i in group)
    assert length_groups(lengths, ratio=10.0) == [[0, 4, 2, 5, 7, 3, 6, 1]]  # one pass
    assert length_groups([], ratio=1.4) == []


def test_tokens_estimate_counts_the_image_tokens_the_processor_makes(tmp_path):
    """`shares` weighs examples by `tokens_estimate`: its image part, read from the files'
    headers alone, is the processor's count of image tokens, for a single view and a tiled
    image (the shapes model's processor: 128-pixel tiles)."""
    from mlx_lfm2vl.shapes import MODEL

    processor = Processor.from_pretrained(MODEL)
    settings = processor.image_processor.settings
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"},
    ]
    text_only = tokens_estimate(Example(messages, [], "-"), settings)
    image_tokens = []
    for size in ((150, 130), (600, 420)):
        path = tmp_path / f"{size[0]}.png"
        Image.new("RGB", size, (200, 30, 30)).save(path)
        example = Example(messages, [path], "-")
        encoded = encode(processor, example)
        made = int((np.asarray(encoded.input_ids) == 396).sum())  # <image> tokens
        assert tokens_estimate(example, settings) - text_only == made
        image_tokens.append(made)
    assert image_tokens[1] > 3 * image_tokens[0]  # tiles and a thumbnail against one view
