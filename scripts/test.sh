#!/usr/bin/env bash
# The whole test suite on a fresh machine: makes or reuses the environment, then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/core -k cache).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$here/scripts/setup_env.sh" | tail -n 1)"
cd "$here"
export CAUSVID_REQUIRE_HOST=1 PYTHONUNBUFFERED=1
"$venv/bin/python" -m ruff check causvid_core nodes training bench tests scripts
"$venv/bin/python" -m pytest "$@"
