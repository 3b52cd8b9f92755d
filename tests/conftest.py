"""Shared test fixtures: seeded torch, the real ComfyUI host tree (scripts/setup_env.sh makes it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CAUSVID_CACHE", Path.home() / ".cache" / "comfyui-causvid"))
COMFYUI_ROOT = Path(os.environ.get("CAUSVID_COMFYUI", CACHE / "comfyui-host" / "ComfyUI"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny models
    run many times faster that way on a shared 2-core machine, without threads spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    """Put the real ComfyUI host on sys.path (CPU only) and return its folder.

    Skipped when the host is absent, unless CAUSVID_REQUIRE_HOST=1 (the test command sets it),
    where a missing host fails the run instead of hiding the tests.
    """
    if not (COMFYUI_ROOT / "comfy" / "ldm" / "wan" / "model.py").exists():
        msg = f"ComfyUI test host not found at {COMFYUI_ROOT}: run scripts/setup_env.sh"
        if os.environ.get("CAUSVID_REQUIRE_HOST") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    if str(COMFYUI_ROOT) not in sys.path:
        sys.path.insert(0, str(COMFYUI_ROOT))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    return COMFYUI_ROOT
