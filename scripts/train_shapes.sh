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
# The decoder again with a shape term (encoder frozen, so the latents below do not change): the first
# VAE keeps colour and motion but rounds the edges off, and the Shapes figures then misread the shape.
stage vae --decoder-only true --mask-weight 1 --steps 600 --image-steps 0 --guide-steps 0 --lr 3e-5 \
      --warmup-steps 20 --resume
stage precompute
stage teacher --data "$LATENTS" --resume
stage ode-pairs
stage ode-init --resume
stage dmd --resume
"$PY" -m training.export --name shapes --runs-dir "$RUNS"
