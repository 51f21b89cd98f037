"""The batch command line: many requests answered together, one JSON line each, resumable.

    python -m mlx_lfm2vl.batch --images photos/ --prompt "Describe this image." --output out.jsonl
    python -m mlx_lfm2vl.batch --requests requests.jsonl --output out.jsonl
    mlx.launch -n 2 -- python -m mlx_lfm2vl.batch --requests requests.jsonl --output out.jsonl

Requests go through one `BatchEngine` (continuous batching): at most --max-rows are decoded
together, and a new request is read, preprocessed and submitted as soon as a row is free, so
memory does not grow with the input.

The output file is the run's state. Each finished request is one complete line, written with a
single `os.write` on an O_APPEND descriptor (fsync'ed every few seconds and at the end), so a
killed run loses at most the rows in flight and never leaves half a line (a power cut might: a
rerun drops a last line without its newline). A rerun with the same --output skips the ids that
have a result and retries the ids that failed (their error rows are dropped first).

Under `mlx.launch` each process (rank) answers the requests whose index % size == rank into a
part file of its own beside the output; rank 0 merges the parts into the output at the end. Part
files left by a killed run are folded into the output when the next run starts, whatever the
number of processes then.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .errors import Lfm2VlError
from .generate import DEFAULT_MAX_TOKENS, DEFAULT_MODEL

if TYPE_CHECKING:
    from .batch import BatchEngine

# Each row holds a KV cache of its own; 8 rows already share each read of the weights 8 ways.
DEFAULT_MAX_ROWS = 8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Seconds between fsyncs of the output: a killed process loses nothing written (the page cache
# outlives it); this bounds what a power cut can take.
FSYNC_INTERVAL = 2.0
# The options a request line may set, with the JSON type each must have (the values themselves
# are checked by the engine and the processor).
_OPTION_TYPES: dict[str, str] = {
    "max_tokens": "an integer",
    "temperature": "a number",
    "top_p": "a number",
    "top_k": "an integer",
    "min_p": "a number",
    "repetition_penalty": "a number",
    "repetition_context_size": "an integer",
    "seed": "an integer",
    "stop": "a string or a list of strings",
    "max_image_tokens": "an integer",
    "min_image_tokens": "an integer",
    "do_image_splitting": "true or false",
}


class _OtherRankFailed(Exception):
    """Another process of an `mlx.launch` run failed (it prints why) or was lost."""


@dataclass
class Request:
    """One line of the input. `images` as written (the output repeats them), `paths` as opened
    (relative to the requests file); `error` is set when the line itself is wrong."""

    index: int
    id: str | int
    prompt: Any = None
    images: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _key(request_id: str | int) -> str:
    # 7 and "7" are different ids, as in the JSON
    return json.dumps(request_id)


# --------------------------------------------------------------------------------------------
# Input: a folder or glob of images, or a JSON lines file of requests
# --------------------------------------------------------------------------------------------


def find_images(patterns: Sequence[str]) -> list[str]:
    """The image files of each folder (by suffix, not recursive) or glob (`**` recursive), in
    sorted order, each once."""
    found: dict[str, None] = {}
    for pattern in patterns:
        folder = Path(pattern)
        if folder.is_dir():
            try:
                matches = [str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            except OSError as e:
                raise Lfm2VlError(f"cannot list --images {pattern} ({e.strerror})") from None
        elif folder.is_file():  # a file name that glob would misread ("photo[1].jpg")
            matches = [pattern]
        else:
            matches = glob.glob(pattern, recursive=True)
        matches = sorted(m for m in matches if Path(m).is_file())
        if not matches:
            raise Lfm2VlError(
                f"no images matched --images {pattern!r}: pass a folder of images "
                f"({', '.join(IMAGE_SUFFIXES)}) or a quoted glob such as 'photos/**/*.jpg'"
            )
        found.update(dict.fromkeys(matches))
    return list(found)


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line."""
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as e:
                    raise Lfm2VlError(
                        f"{path} line {number} is not JSON ({e}): write one JSON object per line"
                    ) from None
                if not isinstance(value, dict):
                    raise Lfm2VlError(
                        f"{path} line {number} is not a JSON object: write one object per line, "
                        'such as {"prompt": "Describe this image.", "images": ["cat.jpg"]}'
                    )
                yield number, value
    except OSError as e:
        raise Lfm2VlError(f"cannot read --requests {path} ({e.strerror}): pass a JSONL file") from e
    except UnicodeDecodeError as e:
        raise Lfm2VlError(f"{path} is not UTF-8 text ({e.reason}): save it as UTF-8") from None


def scan_requests(path: Path) -> list[str | int]:
    """The id of every request of a JSON lines file, checked to be unique (the output is keyed
    by them); a line without an id gets its line number."""
    ids: list[str | int] = []
    lines: dict[str, int] = {}
    for number, value in _json_lines(path):
        request_id = value.get("id", number)
        if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
            raise Lfm2VlError(f"{path} line {number}: 'id' must be a string or an integer")
        key = _key(request_id)
        if key in lines:
            raise Lfm2VlError(
                f"{path} lines {lines[key]} and {number} have the same id {request_id!r}: give "
                "each request its own id (the output and resuming are keyed by it)"
            )
        lines[key] = number
        ids.append(request_id)
    return ids


def _type_error(name: str, value: Any) -> str | None:
    kind = _OPTION_TYPES[name]
    if kind == "true or false":
        ok = isinstance(value, bool)
    elif isinstance(value, bool):
        ok = False
    elif kind == "an integer":
        ok = isinstance(value, int)
    elif kind == "a number":  # JSON in Python may hold NaN and Infinity
        ok = isinstance(value, (int, float)) and math.isfinite(value)
    else:
        ok = isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(s, str) for s in value)
        )
    return None if ok else f"{name!r} must be {kind}, not {json.dumps(value)}"


def request_from_json(
    index: int, number: int, value: dict[str, Any], folder: Path, default_prompt: str | None
) -> Request:
    """The request of one line of a requests file in `folder`; what is wrong with it, in
    `error`."""
    request = Request(index, value.get("id", number))
    unknown = sorted(set(value) - {"id", "prompt", "images", *_OPTION_TYPES})
    if unknown:
        request.error = (
            f"unknown key(s) {', '.join(unknown)}: a request has id, prompt, images and "
            f"generation options ({', '.join(_OPTION_TYPES)})"
        )
        return request
    prompt = value.get("prompt", default_prompt)
    images = value.get("images", [])
    images = [images] if isinstance(images, str) else images
    errors = [_type_error(k, v) for k, v in value.items() if k in _OPTION_TYPES]
    if prompt is None:
        errors.append("no 'prompt' (and no --prompt for requests without one)")
    elif not isinstance(prompt, str) and not (
        isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)
    ):
        errors.append("'prompt' must be a string or a list of chat messages")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        errors.append("'images' must be a list of paths (relative to the requests file) or URLs")
    request.error = "; ".join(e for e in errors if e) or None
    if request.error is None:
        request.prompt, request.images = prompt, images
        request.paths = [
            i if i.startswith(("http://", "https://")) else str(folder / i) for i in images
        ]
        request.options = {k: v for k, v in value.items() if k in _OPTION_TYPES}
    return request


# --------------------------------------------------------------------------------------------
# Output: one JSON line per request, appended whole
# --------------------------------------------------------------------------------------------


def _encode(row: dict[str, Any]) -> bytes:
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 (lone surrogates): escape it
        return (json.dumps(row) + "\n").encode("ascii")


class RowWriter:
    """Appends rows to a file, each as one complete line (one `os.write` on an O_APPEND
    descriptor: a killed process leaves whole lines), fsync'ed every FSYNC_INTERVAL seconds and
    on close."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._synced = time.monotonic()

    def write(self, row: dict[str, Any]) -> None:
        data = _encode(row)
        while data:  # a regular file takes it whole; a short write (disk full) goes on
            data = data[os.write(self._fd, data) :]
        if time.monotonic() - self._synced > FSYNC_INTERVAL:
            os.fsync(self._fd)
            self._synced = time.monotonic()

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)


_ROW_START = b'{"id": '  # how every row written here begins


def _rows(path: Path) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
    """(line, row) of each line of a results file, the line with its newline. The row is None
    for a blank line, or for a last line cut short by a crash (no newline: the start of a row).
    Any other line that is not a row is an error: the file is not ours, and must not be
    rewritten."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            torn = not line.endswith(b"\n")
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and "id" in row:
                yield line + b"\n" if torn else line, row
            elif not line.strip() or (torn and line[: len(_ROW_START)] == _ROW_START[: len(line)]):
                yield line, None
            else:
                raise Lfm2VlError(
                    f"--output {path} line {number} is not a result of this command: pass "
                    "another --output (a rerun adds to its own output file only)"
                )


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def part_files(output: Path) -> list[Path]:
    """Part files of `mlx.launch` runs beside `output` (`rank_part(output, r)`)."""
    pattern = glob.escape(output.name) + ".rank*.part"
    return sorted(output.parent.glob(pattern))


def rank_part(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}.part")


def prepare_output(output: Path, leftovers: Sequence[Path] = ()) -> set[str]:
    """The ids already answered in `output` (keys, `_key`); first, if needed, the file is
    rewritten (atomically) to hold only them: without error rows (those requests are retried),
    without a torn last line, with the answers of `leftovers` (part files of a killed
    `mlx.launch` run) folded in, which are then removed."""
    done: set[str] = set()
    clean = not leftovers and (not output.exists() or _ends_with_newline(output))
    for source in [output, *leftovers]:
        if not source.exists():
            continue
        for _, row in _rows(source):
            if row is None or "error" in row or _key(row["id"]) in done:
                clean = False
            else:
                done.add(_key(row["id"]))
    if clean:
        return done
    temporary = output.with_name(f".{output.name}.tmp")
    written: set[str] = set()
    with open(temporary, "wb") as out:
        for source in [output, *leftovers]:
            if not source.exists():
                continue
            for line, row in _rows(source):
                if row is not None and "error" not in row and _key(row["id"]) not in written:
                    written.add(_key(row["id"]))
                    out.write(line)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, output)
    for part in leftovers:
        part.unlink()
    return done


def answered(output: Path) -> set[str]:
    """The ids in `output` (read-only; `prepare_output` has cleaned it)."""
    if not output.exists():
        return set()
    return {_key(row["id"]) for _, row in _rows(output) if row is not None and "error" not in row}


def merge_parts(output: Path, parts: Sequence[Path]) -> None:
    """Append the rows of each part file to `output`, then remove the parts. A crash between
    the two leaves rows twice; the next run's `prepare_output` keeps one of each."""
    with open(output, "ab") as out:
        for part in parts:
            with open(part, "rb") as rows:
                while chunk := rows.read(1 << 20):
                    out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    for part in parts:
        part.unlink()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Totals:
    """What a run wrote: rows (error rows included), error rows, generated tokens."""

    rows: int = 0
    errors: int = 0
    tokens: int = 0


def run_requests(
    engine: BatchEngine,
    requests: Iterator[Request],
    writer: RowWriter,
    defaults: dict[str, Any],
    system: str | None = None,
    on_row: Callable[[Totals], None] | None = None,
) -> Totals:
    """Answer `requests` with `engine`, writing one row each as it finishes. A request is read
    (and its images preprocessed) only when a row is free for it: at most `engine.max_rows` are
    held at a time."""
    totals = Totals()
    running: dict[int, tuple[Request, list[str]]] = {}

    def finish(row: dict[str, Any]) -> None:
        writer.write(row)
        totals.rows += 1
        totals.errors += "error" in row
        if on_row is not None:
            on_row(totals)

    pending = True
    while True:
        while pending and len(running) < engine.max_rows:
            request = next(requests, None)
            if request is None:
                pending = False
                break
            if request.error is not None:
                finish({"id": request.id, "error": request.error})
                continue
            try:
                request_id = engine.submit(
                    _with_system(request, system, engine.processor.image_token),
                    request.paths or None,
                    **{**defaults, **request.options},
                )
            except Lfm2VlError as e:
                finish({"id": request.id, "error": str(e)})
                continue
            running[request_id] = (request, [])
        if not running:
            return totals
        for request_id, chunk in engine.step():
            request, texts = running[request_id]
            texts.append(chunk.text)
            if chunk.finish_reason is None:
                continue
            del running[request_id]
            stats = chunk.stats
            totals.tokens += stats.generation_tokens
            finish(
                {
                    "id": request.id,
                    "images": request.images,
                    "prompt": request.prompt,
                    "text": "".join(texts),
                    "finish_reason": chunk.finish_reason,
                    "tokens": stats.generation_tokens,
                    "prompt_tokens": stats.prompt_tokens,
                    "image_tokens": stats.image_tokens,
                    "time_to_first_token": round(stats.time_to_first_token, 4),
                    "generation_tps": round(stats.generation_tps, 2),
                }
            )


def _with_system(request: Request, system: str | None, image_token: str) -> Any:
    """A string prompt with --system becomes chat messages, its images placed as a string
    prompt places them (at its markers, else first)."""
    if system is None or not isinstance(request.prompt, str):
        return request.prompt
    images = [] if image_token in request.prompt else [{"type": "image"} for _ in request.paths]
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": [*images, {"type": "text", "text": request.prompt}]},
    ]


def all_sum_ints(group: Any, values: list[int]) -> list[int]:
    """The sum over the ranks of `values`; also the barrier of an `mlx.launch` run (the shapes
    build's processes use it too)."""
    if group.size() == 1:
        return values
    try:
        return mx.distributed.all_sum(
            mx.array(values, mx.int32), group=group, stream=mx.cpu
        ).tolist()
    except RuntimeError as e:  # "[ring] connection to a peer was lost": a rank died
        raise _OtherRankFailed from e


def _agree(group: Any, failure: Lfm2VlError | None) -> None:
    """Every rank goes on, or every rank stops: the one that failed with its error."""
    failed = all_sum_ints(group, [failure is not None])[0]
    if failure is not None:
        raise failure
    if failed:
        raise _OtherRankFailed


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _cli():
    # click is imported here, as in generate.py: importing this module stays cheap.
    import click

    from .cli_options import (
        command,
        image_options,
        max_rows_option,
        max_tokens_option,
        model_option,
        sampling_options,
        seed_option,
    )

    @command()
    @model_option(DEFAULT_MODEL)
    @click.option(
        "--images",
        "patterns",
        multiple=True,
        metavar="DIR_OR_GLOB",
        help="A folder (its image files) or a quoted glob ('photos/**/*.jpg'); one request per "
        "image, with --prompt, its path as id. Repeat for several.",
    )
    @click.option(
        "--requests",
        "requests_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help='A JSONL file, one request per line: {"id": ..., "prompt": "..." or chat '
        'messages, "images": [paths relative to the file], "max_tokens": 64, ...}: any of '
        + ", ".join(_OPTION_TYPES)
        + ". id defaults to the line number, prompt to --prompt, options to the flags.",
    )
    @click.option(
        "--output",
        type=click.Path(dir_okay=False, path_type=Path),
        required=True,
        help="JSONL file of results, one line per request. A rerun skips the ids it holds "
        "and retries the ones that failed.",
    )
    @click.option(
        "--prompt",
        default=None,
        help="The prompt of every image (--images), or of request lines without one (--requests).",
    )
    @click.option("--system", default=None, help="System message for the string prompts.")
    @max_rows_option(
        DEFAULT_MAX_ROWS, "Requests decoded together; a new one joins as one finishes."
    )
    @max_tokens_option(DEFAULT_MAX_TOKENS, "Most tokens to generate per request.")
    @sampling_options()
    @click.option(
        "--stop", "stops", multiple=True, help="Stop string (not in the text); repeat for several."
    )
    @image_options()
    @seed_option(
        "Seed of every request (its answer is then the same whatever it is batched with); a "
        "request's own seed wins. Default: random."
    )
    @click.option("--quiet", is_flag=True, help="No progress bar and no summary on stderr.")
    @click.option("--verbose", is_flag=True, help="Also print model, device and speed to stderr.")
    def cli(
        model: str,
        patterns: tuple[str, ...],
        requests_file: Path | None,
        output: Path,
        prompt: str | None,
        system: str | None,
        max_rows: int,
        max_tokens: int,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        min_p: float | None,
        repetition_penalty: float | None,
        stops: tuple[str, ...],
        min_image_tokens: int | None,
        max_image_tokens: int | None,
        no_image_splitting: bool,
        seed: int | None,
        quiet: bool,
        verbose: bool,
    ) -> None:
        """Answer many requests with an LFM2-VL model, decoded together; one JSON line each.

        Each output line has id, images, prompt, text, finish_reason, tokens, prompt_tokens,
        image_tokens, time_to_first_token (s, from when the request was read) and
        generation_tps; a request that fails (unreadable image, bad option) gets
        {"id": ..., "error": "..."} and the run goes on. Rows are written as they finish, so
        their order is not the input's. A rerun with the same --output resumes: it skips the
        ids answered and retries the failed ones. Under mlx.launch every process takes its share
        of the requests (--output must then be on a folder all hosts share).

        \b
        Examples:
          python -m mlx_lfm2vl.batch --images photos/ --prompt "Describe this image." \\
              --output captions.jsonl
          python -m mlx_lfm2vl.batch --requests requests.jsonl --output results.jsonl
          mlx.launch -n 2 -- python -m mlx_lfm2vl.batch --requests requests.jsonl \\
              --output results.jsonl
        """
        if bool(patterns) == (requests_file is not None):
            raise click.UsageError("pass --images DIR_OR_GLOB or --requests FILE (one of them)")
        if patterns and prompt is None:
            raise click.UsageError("--images needs --prompt")
        for flag, text in (("--prompt", prompt or ""), ("--system", system or "")):
            if any("\udc80" <= c <= "\udcff" for c in text):
                raise Lfm2VlError(f"{flag} is not UTF-8 text: pass it in UTF-8")
        if not output.parent.is_dir():
            raise Lfm2VlError(f"--output {output}: folder {output.parent} does not exist")
        ids, requests = _inputs(patterns, requests_file, prompt, output)
        defaults: dict[str, Any] = {"max_tokens": max_tokens}
        for name, value in (
            ("temperature", temperature),
            ("top_p", top_p),
            ("top_k", top_k),
            ("min_p", min_p),
            ("repetition_penalty", repetition_penalty),
            ("seed", seed),
            ("min_image_tokens", min_image_tokens),
            ("max_image_tokens", max_image_tokens),
        ):
            if value is not None:
                defaults[name] = value
        if stops:
            defaults["stop"] = list(stops)
        if no_image_splitting:
            defaults["do_image_splitting"] = False

        group = mx.distributed.init()
        rank, size = group.rank(), group.size()
        writing = rank_part(output, rank) if size > 1 else output

        # Rank 0 cleans the output (and folds in the parts of a killed run) before anyone reads
        # it, and lays out every rank's part file: a rank that cannot see its part is on another
        # host whose folder is not shared, and the merge would miss its rows.
        failure = None
        if rank == 0:
            try:
                done = prepare_output(output, part_files(output))
                for r in range(size if size > 1 else 0):
                    rank_part(output, r).touch()
            except Lfm2VlError as e:
                failure = e
        _agree(group, failure)
        if rank != 0:
            done = answered(output)
            if not writing.exists():
                failure = Lfm2VlError(
                    f"{writing} (made by rank 0) is not on this host: under mlx.launch on "
                    "several hosts, --output must be in a folder they all share"
                )
        mine = {i for i, key in enumerate(map(_key, ids)) if i % size == rank and key not in done}
        engine = folder_path = None
        if mine and failure is None:
            try:
                engine, folder_path = _load_engine(model, max_rows)
            except Lfm2VlError as e:
                failure = e
        _agree(group, failure)

        echo = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
        if verbose and engine is not None and rank == 0:
            for line in _describe(engine, folder_path):
                echo(line)
        start = time.perf_counter()
        totals = Totals()
        if engine is not None:
            totals = _run_with_progress(
                engine, requests, mine, writing, defaults, system, quiet, rank, size
            )
        todo, rows, errors, tokens = all_sum_ints(
            group, [len(mine), totals.rows, totals.errors, totals.tokens]
        )
        elapsed = time.perf_counter() - start
        if rank != 0:
            return
        if size > 1:
            merge_parts(output, [rank_part(output, r) for r in range(size)])
        skipped = len(ids) - todo
        counts = [f"{rows - errors} answered"]
        if errors:
            counts.append(f"{errors} failed (error rows; a rerun retries them)")
        if skipped:
            counts.append(f"{skipped} done before")
        summary = f"{output}: {', '.join(counts)}"
        if rows:
            summary += f" in {elapsed:.1f} s ({(rows - errors) / elapsed:.2f} requests/s, "
            summary += f"{tokens / elapsed:.1f} tokens/s"
            summary += f" on {size} processes)" if size > 1 else ")"
        echo(summary)
        if verbose and engine is not None:
            echo(f"peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")

    return cli


def _inputs(
    patterns: Sequence[str], requests_file: Path | None, prompt: str | None, output: Path
) -> tuple[list[str | int], Callable[[], Iterator[Request]]]:
    """The id of every request, and a function that reads the requests one by one."""
    if requests_file is None:
        paths = find_images(patterns)
        return paths, lambda: (Request(i, p, prompt, [p], [p]) for i, p in enumerate(paths))
    if output.exists() and output.resolve() == requests_file.resolve():
        raise Lfm2VlError("--output is the --requests file: write the results elsewhere")
    ids = scan_requests(requests_file)

    def requests() -> Iterator[Request]:
        for index, (number, value) in enumerate(_json_lines(requests_file)):
            yield request_from_json(index, number, value, requests_file.parent, prompt)

    return ids, requests


def _load_engine(model: str, max_rows: int) -> tuple[BatchEngine, Path]:
    import warnings

    import click

    from . import load
    from .batch import BatchEngine
    from .loading import resolve_model_path

    folder = resolve_model_path(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        loaded_model, processor = load(folder)
    for warning in caught:  # one line each, not Python's two-line format with source
        click.echo(f"warning: {warning.message}", err=True)
    return BatchEngine(loaded_model, processor, max_rows=max_rows), folder


def _describe(engine: BatchEngine, folder: Path) -> list[str]:
    dtype = str(engine.model.language_model.embedding_norm.weight.dtype).split(".")[-1]
    device = mx.default_device().type.name
    lines = [f"model: {folder} (compute dtype {dtype}, device {device})"]
    if device == "cpu":
        from .cpu.blas import blas_in_use

        lines.append(f"BLAS: {blas_in_use()}")
    lines.append(f"rows decoded together: at most {engine.max_rows}")
    return lines


def _run_with_progress(
    engine: BatchEngine,
    requests: Callable[[], Iterator[Request]],
    mine: set[int],
    path: Path,
    defaults: dict[str, Any],
    system: str | None,
    quiet: bool,
    rank: int,
    size: int,
) -> Totals:
    from tqdm import tqdm

    # disable=None: shown only when stderr is a terminal
    bar = tqdm(
        total=len(mine),
        desc=f"rank {rank}" if size > 1 else "requests",
        unit="req",
        file=sys.stderr,
        disable=True if quiet else None,
        dynamic_ncols=True,
    )
    start = time.perf_counter()

    def on_row(totals: Totals) -> None:
        bar.set_postfix(
            errors=totals.errors,
            tokens_per_s=f"{totals.tokens / max(time.perf_counter() - start, 1e-9):.1f}",
            refresh=False,
        )
        bar.update(1)

    writer = RowWriter(path)
    try:
        todo = (r for r in requests() if r.index in mine)
        return run_requests(engine, todo, writer, defaults, system, on_row)
    finally:
        writer.close()
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (arguments from `sys.argv` when None); returns the exit code. User
    errors print one line on stderr; failed requests are error rows, not a failed run."""
    import click

    from .cli_options import run_command

    interrupted = "interrupted: the rows written so far are kept; rerun to resume"
    try:
        return run_command(_cli(), argv, "python -m mlx_lfm2vl.batch", interrupted)
    except _OtherRankFailed:
        click.echo(
            "error: another process of this mlx.launch run failed or was lost (see its "
            "message); rerun the same command to resume",
            err=True,
        )
        return 1


def run() -> None:
    """The program (`python -m mlx_lfm2vl.batch`, the `mlx-lfm2vl-batch` script): on Linux it
    first relaunches itself with a fast BLAS preloaded (`cpu.blas`); apps call `main()`."""
    from . import relaunch_with_fast_blas

    relaunch_with_fast_blas()
    sys.exit(main())
