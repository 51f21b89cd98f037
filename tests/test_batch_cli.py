"""`python -m mlx_lfm2vl.batch` end to end, in subprocesses: inputs, output rows, errors, resuming,
a SIGKILL mid-run and two processes under `mlx.launch`.

Texts are compared with `generate` (greedy) on `talking_checkpoint` (conftest.py), a fixture that
writes real text, so a row given another request's answer would show.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_checks import REPO, assert_one_line_error, environment, launch
from PIL import Image

from mlx_lfm2vl import generate, load

PROMPT = "Describe this image."


def run_batch(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_lfm2vl.batch", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(),
        cwd=cwd,
    )


def rows_of(path: Path) -> list[dict]:
    """Every line of a results file, each of which must be a whole JSON row."""
    lines = path.read_bytes().splitlines(keepends=True)
    assert all(line.endswith(b"\n") for line in lines)
    return [json.loads(line) for line in lines]


def save_image(path: Path, seed: int, size: tuple[int, int] = (64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    coarse.resize(size, Image.BILINEAR).save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("batch") / "photos"
    save_image(folder / "a.png", 1)
    save_image(folder / "b.png", 2, (96, 64))
    save_image(folder / "nested" / "c.jpg", 3)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def loaded(talking_checkpoint):
    return load(talking_checkpoint)


def expected_text(loaded, prompt, images=(), **options) -> str:
    model, processor = loaded
    return generate(model, processor, prompt, list(map(str, images)), **options).text


# --------------------------------------------------------------------------------------------
# Inputs and output
# --------------------------------------------------------------------------------------------


def test_folder_and_globs_give_one_row_per_image_and_an_error_row_for_an_unreadable_one(
    talking_checkpoint, photos, loaded, tmp_path
):
    output = tmp_path / "captions.jsonl"
    patterns = [photos, photos / "*.png", photos / "**" / "*.jpg"]  # a.png twice: one row
    args = [a for p in patterns for a in ("--images", p)]
    args += ["--model", talking_checkpoint, "--prompt", PROMPT, "--output", output]
    result = run_batch(*args, "--max-tokens", 6, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "3 answered, 1 failed" in result.stderr

    rows = {row["id"]: row for row in rows_of(output)}
    images = [photos / "a.png", photos / "b.png", photos / "nested" / "c.jpg"]
    broken = str(photos / "broken.png")
    assert sorted(rows) == sorted([broken, *map(str, images)])  # notes.txt is not an image
    assert set(rows[broken]) == {"id", "error"} and "broken.png" in rows[broken]["error"]
    model, processor = loaded
    for image in images:
        row = rows[str(image)]
        alone = generate(model, processor, PROMPT, [str(image)], max_tokens=6, temperature=0)
        assert (row["images"], row["prompt"]) == ([str(image)], PROMPT)
        assert (row["text"], row["finish_reason"], row["tokens"]) == (
            alone.text,
            alone.finish_reason,
            len(alone.tokens),
        )
        assert (row["prompt_tokens"], row["image_tokens"]) == (
            alone.stats.prompt_tokens,
            alone.stats.image_tokens,
        )
        assert row["time_to_first_token"] > 0 and row["generation_tps"] > 0
    assert len({rows[str(image)]["text"] for image in images}) > 1  # the texts tell rows apart


def test_requests_file_with_relative_images_and_options_then_a_rerun_retries_only_errors(
    talking_checkpoint, photos, loaded, tmp_path
):
    job, pics = tmp_path / "job", tmp_path / "job" / "pics"
    pics.mkdir(parents=True)
    shutil.copy(photos / "a.png", pics / "a.png")
    shutil.copy(photos / "nested" / "c.jpg", pics / "c.jpg")
    lines = [
        {"id": "one", "prompt": PROMPT, "images": ["pics/a.png"]},
        {"prompt": "Compare <image> with <image>.", "images": ["pics/a.png", "pics/c.jpg"]},
        None,  # a blank line
        {"id": 7, "prompt": [{"role": "user", "content": "Who are you?"}], "max_tokens": 9},
        {"id": "seeded", "prompt": "Say hi.", "temperature": 0.9, "top_k": 20, "seed": 5},
        {"id": "late", "prompt": PROMPT, "images": ["pics/later.png"]},  # not there yet
        {"id": "typo", "prompt": "Hi", "max_token": 3},
        {"id": "wrong", "prompt": "Hi", "top_k": "many"},
    ]
    requests = job / "requests.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" if line else "\n" for line in lines))
    output = tmp_path / "results.jsonl"
    args = ["--model", talking_checkpoint, "--requests", requests, "--output", output]
    args += ["--max-tokens", 5, "--temperature", 0]
    first = run_batch(*args, cwd=tmp_path)  # image paths are relative to the file, not here
    assert first.returncode == 0, first.stderr
    rows = {row["id"]: row for row in rows_of(output)}
    assert sorted(rows, key=str) == sorted(
        ["one", 2, 7, "seeded", "late", "typo", "wrong"], key=str
    )
    assert "later.png" in rows["late"]["error"]
    assert "max_token" in rows["typo"]["error"] and "max_tokens" in rows["typo"]["error"]
    assert "'top_k' must be an integer" in rows["wrong"]["error"]

    expected = {
        "one": expected_text(loaded, PROMPT, [pics / "a.png"], max_tokens=5, temperature=0),
        2: expected_text(
            loaded,
            "Compare <image> with <image>.",
            [pics / "a.png", pics / "c.jpg"],
            max_tokens=5,
            temperature=0,
        ),
        7: expected_text(loaded, lines[3]["prompt"], max_tokens=9, temperature=0),
        "seeded": expected_text(loaded, "Say hi.", max_tokens=5, temperature=0.9, top_k=20, seed=5),
    }
    assert {key: rows[key]["text"] for key in expected} == expected
    assert rows[2]["images"] == ["pics/a.png", "pics/c.jpg"]  # as written in the request
    assert rows[7]["tokens"] == 9

    # The rerun: finished rows stay as they are (not run again), failed ones are retried.
    answered = [
        line for line in output.read_bytes().splitlines(True) if "error" not in json.loads(line)
    ]
    shutil.copy(photos / "a.png", pics / "later.png")
    second = run_batch(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "1 answered, 2 failed" in second.stderr and "4 done before" in second.stderr
    lines_after = output.read_bytes().splitlines(True)
    assert lines_after[: len(answered)] == answered
    rows = rows_by_id([json.loads(line) for line in lines_after])  # each id once
    assert sorted(rows, key=str) == sorted(
        ["one", 2, 7, "seeded", "late", "typo", "wrong"], key=str
    )
    assert rows["late"]["text"] == expected_text(
        loaded, PROMPT, [pics / "later.png"], max_tokens=5, temperature=0
    )
    assert {key for key, row in rows.items() if "error" in row} == {"typo", "wrong"}


def rows_by_id(rows: list[dict]) -> dict:
    by_id = {json.dumps(row["id"]): row for row in rows}
    assert len(by_id) == len(rows), "an id appears twice"
    return {json.loads(key): row for key, row in by_id.items()}


# --------------------------------------------------------------------------------------------
# A killed run
# --------------------------------------------------------------------------------------------


def test_a_run_killed_mid_write_leaves_whole_lines_and_a_rerun_completes_it(
    talking_checkpoint, loaded, tmp_path
):
    # Many tiny requests: rows are being written all the time, so the kill lands among them.
    count = 150
    requests = tmp_path / "requests.jsonl"
    words = ["cat", "mat", "city", "apples", "pear", "fox", "dog", "street", "night"]
    prompts = {f"q{i}": f"Tell me about the {words[i % 9]} number {i}." for i in range(count)}
    requests.write_text(
        "".join(json.dumps({"id": k, "prompt": p}) + "\n" for k, p in prompts.items())
    )
    output = tmp_path / "results.jsonl"
    args = ["--model", talking_checkpoint, "--requests", requests, "--output", output]
    args += ["--max-tokens", 3, "--temperature", 0, "--max-rows", 4]
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_lfm2vl.batch", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(),
        cwd=REPO,
    )
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if output.exists() and output.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished

    killed = output.read_bytes().splitlines(keepends=True)
    assert 20 <= len(killed) < count
    assert all(line.endswith(b"\n") and json.loads(line)["text"] is not None for line in killed)
    # What a crash mid-write of a row would leave (a power cut can): a torn last line.
    with output.open("ab") as out:
        out.write(killed[-1][: len(killed[-1]) // 2])

    rerun = run_batch(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{count - len(killed)} answered" in rerun.stderr
    lines = output.read_bytes().splitlines(keepends=True)
    assert lines[: len(killed)] == killed
    rows = rows_by_id(rows_of(output))  # every line whole, every id once
    assert sorted(rows) == sorted(prompts)
    for key in ("q0", "q77", "q149"):
        assert rows[key]["text"] == expected_text(loaded, prompts[key], max_tokens=3, temperature=0)


# --------------------------------------------------------------------------------------------
# Several processes: mlx.launch
# --------------------------------------------------------------------------------------------


def test_two_processes_under_mlx_launch_share_the_requests_and_resume_a_killed_run(
    talking_checkpoint, photos, tmp_path
):
    requests = tmp_path / "requests.jsonl"
    lines = [{"id": f"t{i}", "prompt": f"Count the apples, {i}."} for i in range(9)]
    lines += [
        {"id": "a", "prompt": PROMPT, "images": [str(photos / "a.png")]},
        {"id": "b", "prompt": PROMPT, "images": [str(photos / "b.png")]},
        {"id": "broken", "prompt": PROMPT, "images": [str(photos / "broken.png")]},
    ]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = ["--model", talking_checkpoint, "--requests", requests, "--max-tokens", 6]
    options += ["--temperature", 0]
    single = tmp_path / "single.jsonl"
    alone = run_batch(*options, "--output", single)
    assert alone.returncode == 0, alone.stderr
    expected = {row["id"]: row.get("text", "error") for row in rows_of(single)}
    before = {json.loads(line)["id"]: line for line in single.read_bytes().splitlines(True)}

    # What a killed 2-process run leaves: merged rows and an error row in the output, and a
    # part file with a row and a torn line.
    output = tmp_path / "merged.jsonl"
    output.write_bytes(before["t0"] + before["a"] + b'{"id": "t5", "error": "earlier"}\n')
    (tmp_path / "merged.jsonl.rank1.part").write_bytes(before["t1"] + before["t2"][:20])
    result = launch("mlx_lfm2vl.batch", 2, *options, "--output", output)
    assert "Traceback" not in result.stderr, result.stderr
    assert "on 2 processes" in result.stderr  # rank 0's summary over both ranks
    assert "8 answered, 1 failed" in result.stderr and "3 done before" in result.stderr

    assert not list(tmp_path.glob("merged.jsonl.*"))  # the parts are merged and gone
    rows = rows_by_id(rows_of(output))
    assert {key: row.get("text", "error") for key, row in rows.items()} == expected
    lines_after = output.read_bytes().splitlines(True)
    for key in ("t0", "a", "t1"):  # kept as they were, not answered again
        assert before[key] in lines_after
    assert any(text.strip() for text in expected.values())


# --------------------------------------------------------------------------------------------
# Help and one-line errors
# --------------------------------------------------------------------------------------------


def test_help_lists_every_option():
    result = run_batch("--help")
    assert result.returncode == 0
    for flag in (
        "--model",
        "--images",
        "--requests",
        "--output",
        "--prompt",
        "--system",
        "--max-rows",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--min-p",
        "--repetition-penalty",
        "--stop",
        "--min-image-tokens",
        "--max-image-tokens",
        "--no-image-splitting",
        "--seed",
        "--quiet",
        "--verbose",
    ):
        assert flag in result.stdout
    assert "mlx.launch" in result.stdout and "[default: 8" in result.stdout


@pytest.mark.parametrize(
    "case",
    ["no model folder", "no images", "images and requests", "no prompt", "bad line", "same id"],
)
def test_user_errors_are_one_line(case, talking_checkpoint, photos, tmp_path):
    output = tmp_path / "out.jsonl"
    requests = tmp_path / "requests.jsonl"
    model = ["--model", talking_checkpoint]
    images = ["--images", photos, "--prompt", PROMPT]
    if case == "no model folder":
        result = run_batch("--model", tmp_path / "no-model", *images, "--output", output)
        assert_one_line_error(result, "no-model")
    elif case == "no images":
        empty = tmp_path / "none" / "*.png"
        result = run_batch(*model, "--images", empty, "--prompt", PROMPT, "--output", output)
        assert_one_line_error(result, "no images matched", str(empty))
    elif case == "images and requests":
        requests.write_text('{"prompt": "Hi"}\n')
        result = run_batch(*model, *images, "--requests", requests, "--output", output)
        assert_one_line_error(result, "--images", "--requests")
        assert result.returncode == 2
    elif case == "no prompt":
        result = run_batch(*model, "--images", photos, "--output", output)
        assert_one_line_error(result, "--images needs --prompt")
        assert result.returncode == 2
    elif case == "bad line":
        requests.write_text('{"prompt": "Hi"}\n{"prompt": "Hi",\n')
        result = run_batch(*model, "--requests", requests, "--output", output)
        assert_one_line_error(result, "line 2 is not JSON")
    else:
        requests.write_text('{"prompt": "Hi"}\n{"id": 1, "prompt": "Hello"}\n')  # line 1 has id 1
        result = run_batch(*model, "--requests", requests, "--output", output)
        assert_one_line_error(result, "lines 1 and 2 have the same id 1")
    assert not output.exists()
