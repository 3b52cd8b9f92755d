"""The library (causvid_core) and the trainer (training) run without ComfyUI.

Both are imported in a fresh interpreter whose sys.path holds the repository but not the ComfyUI
host, so a stray ``import comfy`` fails loudly here instead of only on a training machine. The
walk imports every module under both packages, so modules added later are covered too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("causvid_core", "training")
# top-level modules of the ComfyUI host tree (the host's nodes.py is ComfyUI's "nodes")
COMFY_MODULES = (
    "comfy", "comfy_extras", "comfy_api", "comfy_api_nodes", "comfy_execution", "comfy_config",
    "comfyui_version", "folder_paths", "server", "execution", "nodes", "node_helpers",
    "latent_preview", "cuda_malloc", "api_server", "middleware",
)  # fmt: skip


def run_clean(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with the repository, not the ComfyUI host, on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    # drop the working directory and any ComfyUI root (a folder holding folder_paths.py)
    prelude = textwrap.dedent(
        f"""
        import os, sys
        sys.path[:] = [p for p in sys.path if p not in ("", ".")]
        sys.path[:] = [p for p in sys.path if not os.path.exists(os.path.join(p, "folder_paths.py"))]
        sys.path.insert(0, {str(REPO)!r})
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_core_and_training_import_without_comfy() -> None:
    """The public modules import with ComfyUI absent and pull in no comfy module."""
    result = run_clean(
        """
        import importlib.util
        spec = importlib.util.find_spec("comfy")
        assert spec is None, f"comfy is importable from {spec.origin}: run this test where ComfyUI is absent"
        import causvid_core, causvid_core.model, causvid_core.config, causvid_core.kv_cache
        import causvid_core.attention, training
        assert not any(m == "comfy" or m.startswith("comfy.") for m in sys.modules), sorted(sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr


def test_every_module_imports_without_comfyui_modules() -> None:
    """Import each module under causvid_core and training; none asks for a ComfyUI module.

    A finder placed first on sys.meta_path records every attempt to import a ComfyUI top-level
    name (or this repository's ``nodes`` glue package, which imports ComfyUI), so an import
    guarded by ``try/except ImportError`` is caught as well.
    """
    result = run_clean(
        f"""
        import importlib, json, pkgutil

        FORBIDDEN = set({list(COMFY_MODULES)!r})
        asked, failed, seen = [], {{}}, []

        def importer():
            # file:line of the import statement, skipping importlib frames
            frame = sys._getframe(2)
            while frame and (frame.f_code.co_filename.startswith("<") or "importlib" in frame.f_code.co_filename):
                frame = frame.f_back
            return f"{{frame.f_code.co_filename}}:{{frame.f_lineno}}" if frame else "?"

        class Recorder:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in FORBIDDEN:
                    asked.append((name, importer()))
                    raise ModuleNotFoundError(f"blocked by test_isolation: {{name}}", name=name)
                return None

        sys.meta_path.insert(0, Recorder())
        for pkg_name in {list(PACKAGES)!r}:
            pkg = importlib.import_module(pkg_name)
            seen.append(pkg_name)
            for info in pkgutil.walk_packages(pkg.__path__, pkg_name + ".", onerror=lambda n: None):
                if info.name.rsplit(".", 1)[-1] == "__main__":
                    continue  # running a CLI is not importing it
                seen.append(info.name)
                try:
                    importlib.import_module(info.name)
                except BaseException as exc:
                    failed[info.name] = f"{{type(exc).__name__}}: {{exc}}"
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
        print(json.dumps({{"asked": asked, "failed": failed, "seen": seen, "loaded": loaded}}))
        """
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "causvid_core.model" in report["seen"] and "training" in report["seen"], report["seen"]
    asked = "\n".join(f"  {name} imported at {where}" for name, where in report["asked"])
    assert not report["asked"], f"causvid_core/training must not import ComfyUI or nodes/:\n{asked}"
    assert not report["loaded"], report["loaded"]
    assert not report["failed"], f"modules that fail to import without ComfyUI: {report['failed']}"
