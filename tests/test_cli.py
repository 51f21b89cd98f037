"""`python -m mlx_lfm2vl.generate` end to end, in a subprocess: exit codes, stdout, stderr.

The answer is compared with the Python API under the same options, on `talking_checkpoint`
(conftest.py), a fixture that writes real text.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_one_line_error
from PIL import Image

from mlx_lfm2vl import generate, load


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "picture.png"
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    coarse.resize((64, 64), Image.BILINEAR).save(path)
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_lfm2vl.generate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).parents[1],
    )


def test_cli_streams_the_api_answer_to_stdout_and_stats_to_stderr(talking_checkpoint, image_file):
    args = ["--model", str(talking_checkpoint), "--image", str(image_file)]
    args += ["--prompt", "Describe this image.", "--system", "Be brief."]
    args += ["--max-tokens", "12", "--temperature", "0"]
    result = run_cli(*args, "--verbose")
    assert result.returncode == 0, result.stderr

    model, processor = load(talking_checkpoint)
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}],
        },
    ]
    expected = generate(model, processor, messages, [str(image_file)], max_tokens=12, temperature=0)
    assert expected.text.strip()  # the fixture really talks
    assert result.stdout == expected.text + "\n"
    for needle in ("compute dtype float32", "device cpu", "time to first token", "tokens/s"):
        assert needle in result.stderr
    assert f"prompt: {expected.stats.prompt_tokens} tokens" in result.stderr
    assert f"generation: {len(expected.tokens)} tokens" in result.stderr
    assert "peak memory" in result.stderr

    quiet = run_cli(*args)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, result.stdout, "")


def test_cli_sampling_and_image_flags_reach_the_api(talking_checkpoint, image_file):
    flags = ["--top-p", "0.9", "--top-k", "20", "--min-p", "0.05", "--repetition-penalty", "1.2"]
    flags += ["--temperature", "0.8", "--seed", "5", "--max-tokens", "10"]
    flags += ["--min-image-tokens", "16", "--max-image-tokens", "32", "--no-image-splitting"]
    result = run_cli(
        "--model", str(talking_checkpoint), "--image", str(image_file), "--prompt", "Hi", *flags
    )
    assert result.returncode == 0, result.stderr
    model, processor = load(talking_checkpoint)
    options = dict(top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.2, temperature=0.8)
    image_options = dict(min_image_tokens=16, max_image_tokens=32, do_image_splitting=False)
    expected = generate(
        model, processor, "Hi", [str(image_file)], seed=5, max_tokens=10, **options, **image_options
    )
    assert result.stdout == expected.text + "\n"
    assert expected.stats.image_tokens <= 32


def test_cli_temperature_0_is_plain_greedy_unless_a_penalty_is_passed(talking_checkpoint):
    args = ["--model", str(talking_checkpoint), "--prompt", "Hi", "--max-tokens", "16"]
    args += ["--temperature", "0"]
    greedy = run_cli(*args)
    penalized = run_cli(*args, "--repetition-penalty", "1.05")
    model, processor = load(talking_checkpoint)
    plain = generate(model, processor, "Hi", max_tokens=16, temperature=0, repetition_penalty=1)
    card = generate(model, processor, "Hi", max_tokens=16, temperature=0, repetition_penalty=1.05)
    assert plain.text != card.text  # the model cards' penalty changes this answer
    assert (greedy.returncode, greedy.stdout) == (0, plain.text + "\n")
    assert (penalized.returncode, penalized.stdout) == (0, card.text + "\n")


def test_cli_run_path_imports_neither_torch_nor_transformers(talking_checkpoint):
    code = (
        "import sys; from mlx_lfm2vl.generate import main; "
        f"code = main(['--model', {str(talking_checkpoint)!r}, '--prompt', 'Hi', "
        "'--max-tokens', '2']); "
        "print(code, 'torch' in sys.modules, 'transformers' in sys.modules, "
        "any(m.startswith('mlx_lm') for m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.splitlines()[-1] == "0 False False False", result.stderr


def test_cli_help_lists_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in (
        "--model",
        "--image",
        "--prompt",
        "--system",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--min-p",
        "--repetition-penalty",
        "--min-image-tokens",
        "--max-image-tokens",
        "--no-image-splitting",
        "--seed",
        "--verbose",
    ):
        assert flag in result.stdout
    assert "LiquidAI/LFM2-VL-450M" in result.stdout


def test_cli_missing_image_is_one_line_error(talking_checkpoint, tmp_path):
    missing = tmp_path / "nope.png"
    result = run_cli("--model", str(talking_checkpoint), "--image", str(missing), "--prompt", "Hi")
    assert_one_line_error(result, str(missing))
    assert result.returncode == 1


def test_cli_unreadable_image_is_one_line_error(talking_checkpoint, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    result = run_cli("--model", str(talking_checkpoint), "--image", str(broken), "--prompt", "Hi")
    assert_one_line_error(result, "broken.png")


def test_cli_folder_as_image_is_reported_as_a_folder(talking_checkpoint, tmp_path):
    result = run_cli("--model", str(talking_checkpoint), "--image", str(tmp_path), "--prompt", "Hi")
    assert_one_line_error(result, str(tmp_path), "is a folder")
    assert "not found" not in result.stderr


def test_cli_prompt_that_is_not_utf8_is_one_line_error(talking_checkpoint):
    # What Python makes of `--prompt "$(printf 'caf\xe9 \xff')"` (Latin-1 bytes): lone
    # surrogates, which it turns back into the same bytes on the way to the subprocess.
    prompt = "caf\udce9 \udcff"
    result = run_cli("--model", str(talking_checkpoint), "--prompt", prompt)
    assert_one_line_error(result, "--prompt is not UTF-8", "byte 0xe9 at character 3")
    system = run_cli("--model", str(talking_checkpoint), "--prompt", "Hi", "--system", prompt)
    assert_one_line_error(system, "--system is not UTF-8")


def test_cli_image_markers_in_the_prompt_place_the_images(talking_checkpoint, image_file):
    prompt = "Look at <image> and say what it shows."
    args = ["--model", str(talking_checkpoint), "--image", str(image_file), "--prompt", prompt]
    result = run_cli(*args, "--max-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    model, processor = load(talking_checkpoint)
    expected = generate(model, processor, prompt, [str(image_file)], max_tokens=8, temperature=0)
    assert result.stdout == expected.text + "\n"
    # One marker per image: two markers for one image is an error, not a third placement.
    two = run_cli(*args[:-1], "Compare <image> with <image>.")
    assert_one_line_error(two, "2 <image> marker(s) but 1 image(s)")


def test_cli_version_is_the_package_version():
    import mlx_lfm2vl

    version = run_cli("--version")
    assert version.returncode == 0
    assert version.stdout.strip().endswith(f"version {mlx_lfm2vl.__version__}")


def test_cli_verbose_says_whether_the_weights_are_quantized(talking_checkpoint, tmp_path):
    from mlx_lfm2vl.convert import convert

    quantized = convert(talking_checkpoint, tmp_path / "q4", quantize=True).path
    for folder, line in (
        (talking_checkpoint, "weights: not quantized"),
        (quantized, "weights: 4-bit affine, recipe mixed-4"),
    ):
        result = run_cli("--model", str(folder), "--prompt", "Hi", "--max-tokens", "2", "--verbose")
        assert result.returncode == 0, result.stderr
        assert line in result.stderr.splitlines()


def test_cli_bad_model_path_is_one_line_error(tmp_path):
    result = run_cli("--model", str(tmp_path / "no-such-model"), "--prompt", "Hi")
    assert_one_line_error(result, "no-such-model")
    empty = run_cli("--model", str(tmp_path), "--prompt", "Hi")
    assert_one_line_error(empty)


def test_cli_damaged_shard_index_is_one_line_error(talking_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(talking_checkpoint, folder)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')  # no weight_map
    result = run_cli("--model", str(folder), "--prompt", "Hi")
    assert_one_line_error(result, "model.safetensors.index.json")


def test_cli_hub_id_unavailable_offline_says_how_to_pass_a_folder(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("--prompt", "Hi", env=env)  # the default model, not in an empty cache
    assert_one_line_error(result, "LiquidAI/LFM2-VL-450M", "folder")


@pytest.mark.parametrize(
    "args",
    [
        ["--prompt", "Hi", "--top-p", "2"],
        ["--prompt", "Hi", "--max-tokens", "0"],
        ["--prompt", "Hi", "--temperature", "warm"],
        [],  # no --prompt
        ["--prompt", "Hi", "--frobnicate"],
    ],
)
def test_cli_usage_errors_are_one_line(args):
    result = run_cli(*args)
    assert_one_line_error(result)
    assert result.returncode == 2


@pytest.mark.parametrize(
    "flag",
    [
        ["--temperature", "nan"],
        ["--temperature", "inf"],
        ["--repetition-penalty", "nan"],
        ["--repetition-penalty", "inf"],
        ["--min-p", "nan"],
        ["--top-p", "nan"],
    ],
)
def test_cli_rejects_non_finite_sampling_values(talking_checkpoint, flag):
    # nan passed click's range checks and the library's comparisons: an empty answer, exit 0.
    result = run_cli("--model", str(talking_checkpoint), "--prompt", "Hi", *flag)
    assert_one_line_error(result, flag[0], "finite")
    assert result.returncode == 2


@pytest.mark.parametrize("seed", ["-5", str(2**64)])
def test_cli_seed_outside_the_unsigned_64_bit_range_is_a_usage_error(talking_checkpoint, seed):
    result = run_cli("--model", str(talking_checkpoint), "--prompt", "Hi", "--seed", seed)
    assert_one_line_error(result, "--seed")
    assert result.returncode == 2


# --------------------------------------------------------------------------------------------
# The examples
# --------------------------------------------------------------------------------------------


def run_example(name: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    repo = Path(__file__).parents[1]
    return subprocess.run(
        [sys.executable, str(repo / "examples" / name), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(repo)},
        cwd=repo,
    )


def test_chat_example_survives_a_bad_image_and_a_failed_turn(talking_checkpoint, image_file):
    from mlx_lfm2vl import Chat

    folder = talking_checkpoint.parent / "greedy"  # greedy: the replies can be compared
    if not folder.exists():
        shutil.copytree(talking_checkpoint, folder)
        (folder / "generation_config.json").write_text('{"eos_token_id": 7, "do_sample": false}')
    session = [
        "Hi",
        "/image /no/such/picture.png",  # refused at once: not attached
        "How are you?",
        f"/image {image_file}",
        "Compare <image> with <image>.",  # two markers, one image: the turn fails
        "Thanks",
    ]
    result = run_example(
        "chat.py", "--model", str(folder), "--max-tokens", "6", stdin="\n".join(session) + "\n"
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    replies = [
        None if part.startswith("\nerror: ") else part.split("\n[", 1)[0]
        for part in result.stdout.split("model> ")[1:]
    ]
    model, processor = load(folder)
    chat = Chat(model, processor, max_tokens=6)
    expected = [chat.ask(text).text for text in ("Hi", "How are you?")]
    expected += [None, chat.ask("Thanks").text]  # the failed turn left no trace
    assert replies == expected
    assert "picture.png" in result.stdout and "(image not attached)" in result.stdout
    assert "dropped the 1 attached image(s)" in result.stdout


def test_batch_caption_example_with_a_missing_folder_is_one_line_error(tmp_path):
    result = run_example("batch_caption.py", str(tmp_path / "photos"), str(tmp_path / "out.jsonl"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot list {tmp_path / 'photos'} (No such file or directory): pass a folder "
        "of images"
    ]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS preload is for Linux's CPU backend")
@pytest.mark.cpu_backend
def test_cli_relaunches_itself_with_openblas_and_the_gemv_forwarder_when_none_is_loaded(
    talking_checkpoint, tmp_path
):
    args = ["--model", str(talking_checkpoint), "--prompt", "Hi", "--max-tokens", "4"]
    env = {"LD_PRELOAD": "", "XDG_CACHE_HOME": str(tmp_path), "MLX_LFM2VL_BLAS_PRELOAD": "1"}
    result = run_cli(*args, "--temperature", "0", "--verbose", env=env)
    assert result.returncode == 0, result.stderr
    assert "BLAS: libopenblas" in result.stderr and "with the gemv forwarder" in result.stderr
    assert list((tmp_path / "mlx_lfm2vl").glob("libgemv_forward-*.so"))

    switched_off = run_cli(
        *args, "--temperature", "0", "--verbose", env={**env, "MLX_LFM2VL_BLAS_PRELOAD": "0"}
    )
    assert switched_off.returncode == 0, switched_off.stderr
    assert "BLAS: MLX's bundled reference BLAS" in switched_off.stderr
    warning = "warning: MLX is using its bundled reference BLAS"
    assert warning in switched_off.stderr and warning not in result.stderr
    assert 'LD_PRELOAD="$(python -m mlx_lfm2vl.cpu)"' in switched_off.stderr
    assert switched_off.stdout.strip() and result.stdout.strip()
