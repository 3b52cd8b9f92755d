"""Fixtures shared by the command-line tests: a tiny random model laid out as embedded:shapes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_embedded

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def embedded_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embedded")
    make_embedded(root, name="shapes")
    return root


@pytest.fixture
def env(embedded_root: Path, monkeypatch) -> dict[str, str]:
    """A tiny random model laid out as embedded:shapes, for this process and its children."""
    monkeypatch.setenv("CAUSVID_EMBEDDED_PATH", str(embedded_root))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
