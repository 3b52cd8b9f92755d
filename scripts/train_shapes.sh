#!/usr/bin/env bash
# The embedded Shapes model's recipe, stage by stage (docs/reproduction.md). Every stage resumes where
# it stopped when the script is run again (--resume; finished shards are skipped), so an interrupted
# run loses at most the steps since its last checkpoint.
#
#   bash scripts/train_shapes.sh            # runs/shapes/..., then ships causvid_core/embedded/shapes
#   RUNS=/data/runs bash scripts/train_shapes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUNS=${RUNS:-runs}
COMMON=(--preset shapes --name shapes --runs-dir "$RUNS")
LATENTS="$RUNS/shapes/latents"

stage() { echo "== $*" >&2; "$PY" -m training.distill "$@" "${COMMON[@]}"; }

stage vae --resume
stage precompute
stage teacher --data "$LATENTS" --resume
stage ode-pairs
stage ode-init --resume
stage dmd --resume
"$PY" -m training.export --name shapes --runs-dir "$RUNS"
