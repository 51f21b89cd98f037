"""The code base stays lint- and format-clean (ruff, configured in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    executable = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    return subprocess.run(
        [executable, *args, str(ROOT)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


@pytest.mark.parametrize("args", [("check",), ("format", "--check")], ids=["lint", "format"])
def test_ruff_reports_nothing(args):
    result = ruff(*args)
    assert result.returncode == 0, result.stdout + result.stderr
