"""Constrained decoding (structured output): the grammar libraries compared, then the port's cost.

Run by hand, never part of the test suite. It needs the `test` extra (the reference builds the
checkpoints) and, for the comparison, the other candidates:

    pip install xgrammar outlines-core      # llguidance is a dependency of the package
    LD_PRELOAD="$(python -m mlx_lfm2vl.cpu)" python benchmarks/bench_constrained.py \\
        [--cache DIR] [--docs 10] [--tokens 48] [--real-model FOLDER]

Two tokenizers: the fixtures' (byte-level BPE, 1078 tokens at ids up to 64399) and one of the
published size (64400 ids, the special tokens at their published ids), learned here from the
Python standard library's source since the real tokenizer.json cannot be downloaded.

Part 1, the mask alone (no model), for each library, tokenizer and schema:
- setup: the tokenizer's compilation (once per tokenizer), the schema's (once per schema and
  tokenizer), and one request's state from those;
- per token: compute the mask, apply it to (1, 65536) float32 logits the port's way (bitmask
  -> np.unpackbits -> mx.where, as constrained.py), pick the allowed token with the largest
  random logit (what a random-weight model does), advance the grammar. Each document runs until
  the end-of-sequence token or 150 tokens;
- correctness: every finished document parses and fits its schema (jsonschema), and the
  end-of-sequence token is allowed only where the text so far is a complete document.

Part 2, end to end with the port's own path (`generate(..., json_schema=...)`): ms per decoded
token with and without the constraint, on the 450M-like fixture and on a random-weight model at
the real LFM2-VL-450M shapes with the full-size tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from checkpoints import build_checkpoint, build_tokenizer, published_special_tokens  # noqa: E402

VOCAB_WIDTH = 65536  # the LM head's width at every published size
MAX_DOC_TOKENS = 150

SCHEMAS = {
    "fields": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "animal": {"enum": ["cat", "dog", "bird"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        },
        "required": ["name", "age", "animal", "tags"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "cat": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "colour": {"enum": ["black", "white", "ginger"]},
                },
                "required": ["name", "colour"],
                "additionalProperties": False,
            },
            "count": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["cat", "count"],
        "additionalProperties": False,
    },
    "any object": {"type": "object"},
}


# ---------------------------------------------------------------- tokenizers


def full_size_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer of the published size, learned from the standard library."""
    if not (folder / "tokenizer.json").is_file():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        texts = [
            p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(stdlib.rglob("*.py"))
            if "site-packages" not in p.parts
        ][:3000]
        build_tokenizer(folder, corpus=texts, vocab_size=64400 - len(published_special_tokens()))
    return folder


def vocabulary(folder: Path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    eos = [tokenizer.token_to_id(config["eos_token"])]
    return tokenizer, eos


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as, inverted."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


# ---------------------------------------------------------------- the libraries
# Each gives: compile_tokenizer (once), compile(schema) (once per schema), start(compiled) (per
# request), fill(state, words) writing the allowed ids as a little-endian bitmask of int32 words,
# advance(state, token) -> whether the grammar took the token.


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, eos: list[int], size: int):
        import llguidance

        self.llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer.to_str(),
            n_vocab=size,
            eos_token=eos,
            slices=llguidance.LLTokenizer.json_slices(),
        )

    def compile(self, schema: dict):
        from mlx_lfm2vl.constrained import _FORMAT, _LIMITS

        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_FORMAT)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=_LIMITS)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def start(self, compiled):
        return compiled.deep_copy()

    def fill(self, state, words: np.ndarray) -> None:
        state.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)

    def advance(self, state, token: int) -> bool:
        return state.consume_token(token)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, eos: list[int], size: int):
        import xgrammar  # imports torch

        self.xgr = xgrammar
        special = set(tokenizer.get_added_tokens_decoder())
        encoded = [""] * size  # an empty entry is never allowed
        for text, i in tokenizer.get_vocab(with_added_tokens=True).items():
            if i not in special:
                encoded[i] = text
        info = xgrammar.TokenizerInfo(
            encoded, vocab_type=xgrammar.VocabType.BYTE_LEVEL, vocab_size=size, stop_token_ids=eos
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.size = size

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": ")
        )

    def start(self, compiled):
        matcher = self.xgr.GrammarMatcher(compiled)
        return matcher, self.xgr.allocate_token_bitmask(1, self.size)

    def fill(self, state, words: np.ndarray) -> None:
        matcher, bitmask = state
        matcher.fill_next_token_bitmask(bitmask)
        words[: bitmask.shape[1]] = bitmask.numpy()[0]

    def advance(self, state, token: int) -> bool:
        return state[0].accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, eos: list[int], size: int):
        import outlines_core

        self.oc = outlines_core
        decoder = _byte_decoder()
        special = set(tokenizer.get_added_tokens_decoder())
        tokens: dict[bytes, list[int]] = {}
        for text, i in tokenizer.get_vocab(with_added_tokens=True).items():
            if i not in special:
                tokens.setdefault(bytes(decoder[c] for c in text), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos[0], tokens)

    def compile(self, schema: dict):
        # outlines-core writes separators without spaces and bounds recursion (depth 3).
        regex = self.oc.json_schema.build_regex_from_schema(
            json.dumps(schema), whitespace_pattern=""
        )
        return self.oc.Index(regex, self.vocabulary)

    def start(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, state, words: np.ndarray) -> None:
        state.write_mask_into(words.ctypes.data, words.size, 4)

    def advance(self, state, token: int) -> bool:
        try:
            state.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True


LIBRARIES = (Llguidance, Xgrammar, OutlinesCore)


# ---------------------------------------------------------------- part 1: the mask alone


def apply_mask(words: np.ndarray, size: int, logits: mx.array) -> mx.array:
    """As `constrained.JsonConstraint`: unpack the bits of the `size` ids the tokenizer has
    (xgrammar leaves the last word's padding bits set), -inf where not allowed."""
    allowed = np.zeros(logits.shape[-1], np.bool_)
    n = min(size, allowed.size)
    allowed[:n] = np.unpackbits(words.view(np.uint8), count=n, bitorder="little").view(np.bool_)
    return mx.where(mx.array(allowed), logits, float("-inf"))


def complete(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def mask_alone(library, tokenizer, eos: list[int], size: int, schema_name: str, docs: int) -> dict:
    import jsonschema

    schema = SCHEMAS[schema_name]
    start = time.perf_counter()
    compiled = library.compile(schema)
    compile_time = time.perf_counter() - start
    key = mx.random.key(0)
    per_token, masks, start_times = [], [], []
    finished = bad = eos_early = rejected = 0
    words = np.zeros((size + 31) // 32, np.int32)
    for _ in range(docs):
        t0 = time.perf_counter()
        state = library.start(compiled)
        start_times.append(time.perf_counter() - t0)
        tokens: list[int] = []
        while len(tokens) < MAX_DOC_TOKENS:
            key, subkey = mx.random.split(key)
            logits = mx.random.normal((1, VOCAB_WIDTH), key=subkey)
            mx.eval(logits)
            t0 = time.perf_counter()
            words[:] = 0
            library.fill(state, words)
            masks.append(time.perf_counter() - t0)
            token = int(mx.argmax(apply_mask(words, size, logits), axis=-1).item())
            taken = token in eos or library.advance(state, token)
            per_token.append(time.perf_counter() - t0)
            if not taken:  # the library's mask allowed a token its parser refuses
                rejected += 1
                break
            if any(words[e // 32] >> (e % 32) & 1 for e in eos):
                eos_early += not complete(tokenizer.decode(tokens))
            if token in eos:
                finished += 1
                try:
                    jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
                except (json.JSONDecodeError, jsonschema.ValidationError):
                    bad += 1
                break
            tokens.append(token)
    return {
        "compile_ms": compile_time * 1e3,
        "start_ms": statistics.median(start_times) * 1e3,
        "mask_ms_median": statistics.median(masks) * 1e3,
        "mask_ms_mean": statistics.fmean(masks) * 1e3,
        "mask_ms_max": max(masks) * 1e3,
        "token_ms_median": statistics.median(per_token) * 1e3,
        "token_ms_mean": statistics.fmean(per_token) * 1e3,
        "tokens": len(per_token),
        "finished": finished,
        "invalid": bad,
        "eos_too_early": eos_early,
        "rejected": rejected,
    }


def part1(tokenizers: dict[str, Path], docs: int) -> None:
    print(
        "## The mask alone (no model)\n\nmask: the library computes the allowed ids; per token: "
        "mask + applying it to 65536 logits + picking the token + advancing the grammar (ms)\n"
    )
    print(
        "| library | tokenizer | tokenizer compile s | schema | schema compile ms | "
        "request start ms | mask median | mask mean | mask max | per token median | "
        "per token mean | tokens | docs finished | invalid | EOS too early | "
        "allowed but refused |"
    )
    print("|" + "---|" * 16)
    for tokenizer_name, folder in tokenizers.items():
        tokenizer, eos = vocabulary(folder)
        size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        for cls in LIBRARIES:
            try:
                start = time.perf_counter()
                library = cls(tokenizer, eos, size)
                setup = time.perf_counter() - start
            except ImportError as e:
                print(f"| {cls.name} | {tokenizer_name} | not installed ({e.name}) |" + " |" * 13)
                continue
            for schema_name in SCHEMAS:
                r = mask_alone(library, tokenizer, eos, size, schema_name, docs)
                print(
                    f"| {cls.name} | {tokenizer_name} | {setup:.2f} | {schema_name} | "
                    f"{r['compile_ms']:.1f} | {r['start_ms']:.3f} | {r['mask_ms_median']:.3f} | "
                    f"{r['mask_ms_mean']:.3f} | {r['mask_ms_max']:.2f} | "
                    f"{r['token_ms_median']:.3f} | {r['token_ms_mean']:.3f} | "
                    f"{r['tokens']} | {r['finished']}/{docs} | "
                    f"{r['invalid']} | {r['eos_too_early']} | {r['rejected']} |",
                    flush=True,
                )
    print()


# ---------------------------------------------------------------- part 2: end to end


def real_shape_model(cache: Path, source: Path | None, tokenizer_folder: Path) -> Path:
    """A random-weight model at the real 450M shapes, with the full-size tokenizer."""
    folder = cache / "lfm2-vl-450m-real-65k"
    if (folder / "tokenizer.json").is_file():
        return folder
    if source is None:
        source = cache / "lfm2-vl-450m-real"
        if not (source / "config.json").is_file():
            build_checkpoint("lfm2-vl-450m-real", source, dtype="bfloat16")
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():  # weights linked, tokenizer files replaced
        if not path.name.startswith(("tokenizer", "special_tokens")):
            target = folder / path.name
            if not target.exists():
                target.symlink_to(path.resolve())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    return folder


def part2(models: dict[str, Path], tokens: int, repeats: int) -> None:
    from mlx_lfm2vl import generate, load
    from mlx_lfm2vl.sampling import suppress_tokens

    print(
        "## End to end: ms per decoded token, median of runs (the settings interleaved), "
        "temperature 1\n"
    )
    print(
        "| model | unconstrained | json_schema='object' | fields schema | "
        "tokens per run (same order) |"
    )
    print("|---|---|---|---|---|")
    for name, folder in models.items():
        model, processor = load(folder)
        settings = {
            "plain": {"logits_processors": [suppress_tokens(processor.eos_token_ids)]},
            "object": {"json_schema": "object"},
            "fields": {"json_schema": SCHEMAS["fields"]},
        }
        times: dict[str, list[float]] = {k: [] for k in settings}
        counts: dict[str, list[int]] = {k: [] for k in settings}
        for i in range(repeats + 1):
            for key, extra in settings.items():
                result = generate(
                    model,
                    processor,
                    "Describe the cat as JSON.",
                    max_tokens=tokens,
                    temperature=1.0,
                    seed=i,
                    **extra,
                )
                if i > 0 and result.stats.generation_tps > 0:  # run 0 warms up
                    times[key].append(1e3 / result.stats.generation_tps)
                    counts[key].append(result.stats.generation_tokens)
        ms = {k: statistics.median(v) for k, v in times.items()}
        versus = {k: f"{ms[k]:.2f} ({(ms[k] / ms['plain'] - 1) * 100:+.1f}%)" for k in ms}
        n = " / ".join(f"{statistics.fmean(counts[k]):.0f}" for k in settings)
        print(
            f"| {name} | {ms['plain']:.2f} | {versus['object']} | {versus['fields']} | {n} |",
            flush=True,
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cache = Path.home() / ".cache" / "mlx_lfm2vl" / "bench" / "constrained"
    parser.add_argument("--cache", type=Path, default=cache)
    parser.add_argument("--docs", type=int, default=10, help="documents per library and schema")
    parser.add_argument("--tokens", type=int, default=48, help="max tokens per end-to-end run")
    parser.add_argument("--repeats", type=int, default=5, help="end-to-end runs per setting")
    parser.add_argument(
        "--real-model",
        type=Path,
        default=None,
        help="a checkpoint at the real 450M shapes to reuse (weights linked, tokenizer replaced)",
    )
    parser.add_argument("--skip-masks", action="store_true", help="skip part 1")
    parser.add_argument("--skip-e2e", action="store_true", help="skip part 2")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)

    fixture = args.cache / "lfm2-vl-450m"
    if not (fixture / "config.json").is_file():
        build_checkpoint("lfm2-vl-450m", fixture)
    full = full_size_tokenizer(args.cache / "tokenizer-64400")
    print(f"machine: {os.cpu_count()} cores; mlx {mx.__version__}\n")
    if not args.skip_masks:
        part1({"fixture (1078 tokens)": fixture, "full size (64400)": full}, args.docs)
    if not args.skip_e2e:
        real = real_shape_model(args.cache, args.real_model, full)
        part2(
            {"450M-like fixture": fixture, "real 450M shapes, 64400 tokens": real},
            args.tokens,
            args.repeats,
        )


if __name__ == "__main__":
    main()
