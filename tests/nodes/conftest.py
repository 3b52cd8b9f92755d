"""Fixtures running the real ComfyUI host: in-process, over HTTP (main.py) and in headless chromium.

Built on tests/conftest.py's ``comfy_root``. Browser pieces (chromium, playwright-core, the 1.58 front end)
come from scripts/setup_browser.sh; without them these tests skip, or fail when CAUSVID_REQUIRE_HOST=1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import make_embedded

sys.path.insert(0, str(Path(__file__).resolve().parent))

import host as host_mod  # noqa: E402  (tests/nodes/host.py, a helper module beside this file)


def _unavailable(msg: str) -> None:
    """Skip, or fail when the test command requires the host (CAUSVID_REQUIRE_HOST=1)."""
    if os.environ.get("CAUSVID_REQUIRE_HOST") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def comfy_host(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> host_mod.InProcessHost:
    """The host's registry and executor in this process (built-in nodes; output in a tmp folder)."""
    return host_mod.InProcessHost(comfy_root, tmp_path_factory.mktemp("comfy_inprocess"))


@pytest.fixture(scope="session")
def host(comfy_host: host_mod.InProcessHost) -> host_mod.InProcessHost:
    """``comfy_host`` with this package imported as a custom node package (custom_nodes/comfyui-causvid)."""
    comfy_host.load_package()
    return comfy_host


@pytest.fixture(scope="session")
def browser_available() -> None:
    """Chromium + node + playwright-core are installed (scripts/setup_browser.sh)."""
    missing = host_mod.browser_missing()
    if missing:
        _unavailable(missing)


@pytest.fixture(scope="session")
def frontend_158() -> Path:
    """The static folder of comfyui-frontend-package 1.58.1 (for main.py --front-end-root)."""
    if not (host_mod.FRONTEND_158 / "index.html").exists():
        _unavailable(f"front end 1.58.1 not found at {host_mod.FRONTEND_158}: run scripts/setup_browser.sh")
    return host_mod.FRONTEND_158


@pytest.fixture(scope="module")
def http_server(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[host_mod.HttpHost]:
    """``main.py --cpu`` with the host's own front end (1.32.9) and this package; one per test module."""
    with host_mod.http_host(comfy_root, tmp_path_factory.mktemp("http_default")) as server:
        yield server


@pytest.fixture(scope="module")
def http_server_158(
    comfy_root: Path, frontend_158: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[host_mod.HttpHost]:
    """``main.py --cpu --front-end-root`` serving the 1.58.1 front end; one per test module."""
    with host_mod.http_host(
        comfy_root, tmp_path_factory.mktemp("http_158"), front_end_root=frontend_158
    ) as server:
        yield server


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """test-artifacts/nodes at the repo root (git-ignored): screenshots kept after the run."""
    folder = host_mod.ARTIFACTS / "nodes"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random model laid out as embedded:shapes (the trained one is not shipped yet); set in os.environ so HTTP servers started later inherit it."""
    root = tmp_path_factory.mktemp("embedded")
    make_embedded(root, name="shapes")
    old = os.environ.get("CAUSVID_EMBEDDED_PATH")
    os.environ["CAUSVID_EMBEDDED_PATH"] = str(root)
    yield root
    if old is None:
        del os.environ["CAUSVID_EMBEDDED_PATH"]
    else:
        os.environ["CAUSVID_EMBEDDED_PATH"] = old
