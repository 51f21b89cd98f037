"""Checks shared by the command-line tests."""

from __future__ import annotations

import subprocess


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A failed run that printed nothing on stdout and one `error: ...` line (no traceback) on
    stderr, containing each needle."""
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
