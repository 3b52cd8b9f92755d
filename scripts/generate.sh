#!/usr/bin/env bash
# The main job on a fresh machine: reuse the test environment when it exists, else make or reuse a
# small one (torch + the core's dependencies, in $CAUSVID_CACHE, default
# ~/.cache/comfyui-causvid/venv-core; torch pinned by $CAUSVID_TORCH, default torch==2.13.0), then run
#   python -m causvid_core generate ARGS...
# e.g. bash scripts/generate.sh --model embedded:shapes --prompt "a red circle moving right" \
#        --seconds 10 --seed 0 --out out.mp4
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${CAUSVID_CACHE:-$HOME/.cache/comfyui-causvid}"
py="${PYTHON:-python3}"
mkdir -p "$cache"
# the package comes from this checkout wherever the command runs, and relative paths (--out, --image, ...)
# stay relative to the directory the user ran it from
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
if "$cache/venv/bin/python" -c "import torch, av, safetensors, einops" 2>/dev/null; then
  exec "$cache/venv/bin/python" -m causvid_core generate "$@"
fi
venv="$cache/venv-core"
stamp="$venv/.causvid-stamp"
want="$(cat "$here/pyproject.toml" "$here/requirements.txt" | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv" >&2
  "$py" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing torch and the core's dependencies (first run only)" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "${CAUSVID_TORCH:-torch==2.13.0}" -r "$here/requirements.txt" >&2
  "$venv/bin/python" -c "import torch, av, safetensors, einops" \
    || { echo "[setup] install failed: see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
exec "$venv/bin/python" -m causvid_core generate "$@"
