"""Shared fixtures: tiny random-weight checkpoints built once per test session by the reference."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

# CI runs the property tests on a fixed sequence of examples so that a landing never depends on
# luck; local runs keep exploring new examples (and hypothesis replays any failure it found).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

from checkpoints import FIXTURES, build_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


_built: dict[str, Path] = {}


def fixture_checkpoint(name: str, root: Path) -> Path:
    """Path of fixture checkpoint `name`, building it on first use in this session."""
    if name not in _built:
        _built[name] = build_checkpoint(name, root / name)
    return _built[name]


@pytest.fixture(scope="session", params=sorted(FIXTURES))
def checkpoint(request, checkpoint_root) -> Path:
    """Each fixture checkpoint in turn (450M-like, 1.6B-like, LFM2.5 field variants)."""
    return fixture_checkpoint(request.param, checkpoint_root)


@pytest.fixture(scope="session")
def checkpoint_450m(checkpoint_root) -> Path:
    return fixture_checkpoint("lfm2-vl-450m", checkpoint_root)


@pytest.fixture(scope="session")
def checkpoint_16b(checkpoint_root) -> Path:
    return fixture_checkpoint("lfm2-vl-1.6b", checkpoint_root)


@pytest.fixture(scope="session")
def checkpoint_450m_real(checkpoint_root) -> Path:
    """Random weights at the real LFM2-VL-450M shapes, stored in bf16 like the published files."""
    name = "lfm2-vl-450m-real"
    if name not in _built:
        _built[name] = build_checkpoint(name, checkpoint_root / name, dtype="bfloat16")
    return _built[name]
