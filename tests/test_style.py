"""The code base stays lint- and format-clean (ruff, configured in pyproject.toml)."""

from __future__ import annotations

import re
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


def test_model_files_are_plain_mlx_math():
    """`models/` holds the model's math and nothing else: what a device needs is installed on a
    loaded model from `mlx_lfm2vl/cpu/` (see its docstring), so no model file asks about the
    device, reads the environment or reaches for native code."""
    allowed_imports = {"__future__", "functools", "math", "mlx", "numpy", "..cache", "..config"}
    allowed_imports |= {"..errors", ".lfm2", ".projector", ".siglip2"}
    forbidden = ("default_device", "os.environ", "ctypes", "sys.platform", "..cpu", "bf16")
    for path in sorted((ROOT / "mlx_lfm2vl" / "models").glob("*.py")):
        source = path.read_text()
        for line in source.splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]):
                module = words[1].split(".")[0] or words[1]
                assert module in allowed_imports or words[1] in allowed_imports, (path, line)
        for word in forbidden:
            assert word not in source, (path.name, word)


def test_repository_files_cited_in_the_code_exist():
    # A comment that sends the reader to a file that is not there (convert.py cited a missing
    # quantization.md under docs).
    cited = re.compile(r"\b((?:docs|tests|benchmarks|examples|mlx_lfm2vl)/[\w./-]+\.(?:md|py))\b")
    missing = {
        f"{path.relative_to(ROOT)}: {name}"
        for folder in ("mlx_lfm2vl", "tests", "examples", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        for name in cited.findall(path.read_text())
        if not (ROOT / name).exists()
    }
    assert not missing, sorted(missing)


def test_links_and_paths_in_the_readme_and_docs_exist():
    """Every relative Markdown link, and every repository path in backquotes, of README.md and
    docs/ names a file or folder of the repository."""
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    quoted = re.compile(r"`((?:docs|tests|benchmarks|examples|mlx_lfm2vl)/[\w./-]*)`")
    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        for target in link.findall(text):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.name}: {target}")
        for path in quoted.findall(text):
            if not (ROOT / path.rstrip(".")).exists():
                missing.append(f"{page.name}: {path}")
    assert not missing, missing
