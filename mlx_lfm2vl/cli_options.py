"""Command-line options shared by the generate, batch and server commands.

One definition of each option, with its range checks and its help, so that the commands cannot
drift apart. Only the command lines import this module (inside their `_cli()`), so
`import mlx_lfm2vl` never imports click.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import click

from . import __version__
from .errors import Lfm2VlError

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _stacked(*decorators: Decorator) -> Decorator:
    """The decorators applied as if written one above the other, the first on top."""

    def apply(function: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    # click's FloatRange lets nan through (every comparison with it is false) and inf.
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number.")
    return value


def command() -> Decorator:
    """A click command with -h as well as --help, 100-column help, and --version."""
    return _stacked(
        click.command(
            context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
        ),
        click.version_option(__version__, "--version", prog_name="mlx-lfm2vl"),
    )


def model_option(default: str, more_help: str = "") -> Decorator:
    return click.option(
        "--model",
        default=default,
        show_default=True,
        help="Checkpoint folder (HF layout or converted) or Hugging Face hub id" + more_help + ".",
    )


def sampling_options() -> Decorator:
    """--temperature, --top-p, --top-k, --min-p, --repetition-penalty: None when not given (the
    checkpoint's generation config, else the library's defaults, decide)."""
    return _stacked(
        click.option(
            "--temperature",
            type=click.FloatRange(min=0),
            callback=finite,
            default=None,
            help="Sampling temperature. 0 is greedy decoding: the most likely token, with no "
            "repetition penalty unless --repetition-penalty (or the checkpoint) sets one. "
            "Default: the checkpoint's, else 0.1.",
        ),
        click.option(
            "--top-p",
            type=click.FloatRange(0, 1, min_open=True),
            callback=finite,
            default=None,
            help="Nucleus sampling mass (1 disables). Default: the checkpoint's, else 1.",
        ),
        click.option(
            "--top-k",
            type=click.IntRange(min=0),
            default=None,
            help="Keep the K most likely tokens (0 disables). Default: the checkpoint's, else 0.",
        ),
        click.option(
            "--min-p",
            type=click.FloatRange(0, 1),
            callback=finite,
            default=None,
            help="Drop tokens below P x the top probability. Default: the checkpoint's, else 0.15.",
        ),
        click.option(
            "--repetition-penalty",
            type=click.FloatRange(min=0, min_open=True),
            callback=finite,
            default=None,
            help="Penalty for tokens already seen (1 disables). Default: the checkpoint's, else "
            "1.05 when sampling and none when greedy (--temperature 0).",
        ),
    )


def image_options() -> Decorator:
    """--min-image-tokens, --max-image-tokens, --no-image-splitting."""
    return _stacked(
        click.option(
            "--min-image-tokens",
            type=click.IntRange(min=1),
            default=None,
            help="Fewest image tokens of a single view or thumbnail (smaller images are "
            "upscaled). Default: the checkpoint's processor config.",
        ),
        click.option(
            "--max-image-tokens",
            type=click.IntRange(min=1),
            default=None,
            help="Token budget of an image encoded as one view (and of a tiled image's "
            "thumbnail). With splitting on, it also sets when an image is tiled: above N x 1024 "
            "x the checkpoint's max_pixels_tolerance (1.5 or 2) pixels it becomes 512x512 tiles "
            "of 256 tokens each plus the thumbnail, so a LOWER value can give MORE tokens (an "
            "800x600 photo: 1590 tokens at 64, 234 at 256). As in the reference, each side of a "
            "view keeps at least 32 pixels, so a very thin image exceeds it (1x10000: one view "
            "of 1600 tokens at 256). Default: the checkpoint's processor config.",
        ),
        click.option(
            "--no-image-splitting",
            is_flag=True,
            help="Encode each image as one view instead of 512x512 tiles (faster, less detail).",
        ),
    )


def image_settings(
    min_image_tokens: int | None, max_image_tokens: int | None, no_image_splitting: bool
) -> dict[str, Any]:
    """The processor options `image_options()` gave, as keywords for generate, the batch engine
    or the trainer: only those the user set (the checkpoint's config decides the rest)."""
    settings: dict[str, Any] = {}
    if min_image_tokens is not None:
        settings["min_image_tokens"] = min_image_tokens
    if max_image_tokens is not None:
        settings["max_image_tokens"] = max_image_tokens
    if no_image_splitting:
        settings["do_image_splitting"] = False
    return settings


def max_rows_option(default: int, help: str) -> Decorator:
    return click.option(
        "--max-rows", type=click.IntRange(min=1), default=default, show_default=True, help=help
    )


def max_tokens_option(default: int, help: str) -> Decorator:
    return click.option(
        "--max-tokens", type=click.IntRange(min=1), default=default, show_default=True, help=help
    )


def seed_option(help: str) -> Decorator:
    return click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None, help=help)


def run_command(
    cli: click.Command, argv: Sequence[str] | None, prog_name: str, interrupted: str
) -> int:
    """Run a command line (arguments from `sys.argv` when None); its exit code. A user error
    (`Lfm2VlError`, a bad option) prints one line on stderr; Ctrl-C prints `interrupted` and
    gives 130. Other exceptions propagate, for the caller to word."""
    try:
        cli.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except Lfm2VlError as e:
        click.echo(f"error: {e}", err=True)
        return 1
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo(interrupted, err=True)
        return 130
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()} (see --help)", err=True)
        return e.exit_code
    return 0
