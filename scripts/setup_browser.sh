#!/usr/bin/env bash
# Browser side of the test host (tests/nodes): headless Debian chromium, playwright-core (node >= 20) to drive it,
# and the newest ComfyUI front end (served with main.py --front-end-root). Everything is cached
# outside the source tree under $CAUSVID_CACHE; each step is skipped when its result is there.
#   /usr/bin/chromium                                          apt-get install chromium (needs root)
#   $CAUSVID_CACHE/node/node_modules/playwright-core             npm install --prefix
#   $CAUSVID_CACHE/frontend-1.58/comfyui_frontend_package/static pip install --no-deps --target
# Usage: setup_browser.sh [PYTHON]   (PYTHON runs pip; default: the test venv's python)
set -euo pipefail
cache="${CAUSVID_CACHE:-$HOME/.cache/comfyui-causvid}"
py="${1:-$cache/venv/bin/python}"
playwright_version="1.65.1"
frontend_version="1.58.1"
frontend="$cache/frontend-1.58"
node_dir="$cache/node"
mkdir -p "$cache"

# Debian packages: chromium, and node/npm only where the machine has none (one apt-get update).
apt_packages=()
if [ -x /usr/bin/chromium ]; then
  echo "[browser] chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo unknown version)"
else
  apt_packages+=(chromium fonts-liberation)
fi
command -v npm >/dev/null || apt_packages+=(nodejs npm)
if [ "${#apt_packages[@]}" -gt 0 ]; then
  echo "[browser] installing Debian packages: ${apt_packages[*]}"
  sudo=""
  if [ "$(id -u)" != "0" ]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  echo "[browser] installed $(/usr/bin/chromium --version 2>/dev/null), node $(node --version)"
fi

pw_json="$node_dir/node_modules/playwright-core/package.json"
if grep -q "\"version\": \"$playwright_version\"" "$pw_json" 2>/dev/null; then
  echo "[browser] playwright-core $playwright_version present in $node_dir"
else
  echo "[browser] installing playwright-core@$playwright_version into $node_dir"
  mkdir -p "$node_dir"
  npm install --prefix "$node_dir" --no-audit --no-fund --loglevel=error "playwright-core@$playwright_version"
fi

if [ -f "$frontend/comfyui_frontend_package/static/index.html" ]; then
  echo "[browser] front end $frontend_version present in $frontend"
else
  echo "[browser] installing comfyui-frontend-package==$frontend_version into $frontend"
  rm -rf "$frontend.partial"
  "$py" -m pip install -q --disable-pip-version-check --no-deps --target "$frontend.partial" \
    "comfyui-frontend-package==$frontend_version" 2>&1 | grep -v "^WARNING: Location" || true
  [ -f "$frontend.partial/comfyui_frontend_package/static/index.html" ] \
    || { echo "[browser] front end install failed: see the pip output above"; exit 1; }
  rm -rf "$frontend"
  mv "$frontend.partial" "$frontend"
fi
