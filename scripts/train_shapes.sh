#!/usr/bin/env bash
# The embedded Shapes model's recipe, stage by stage (docs/reproduction.md). Every stage resumes where
# it stopped when the script is run again (--resume; finished shards are skipped), so an interrupted
# run loses at most the steps since its last checkpoint.
#
#   bash scripts/train_shapes.sh            # runs/shapes/..., then ships causvid_core/embedded/shapes
#   RUNS=/data/runs bash scripts/train_shapes.sh
#
# The VAE trains in one process (all threads); the later stages run data parallel on NPROC ranks of one
# thread each (default 2: on a 2-core CPU two one-thread ranks move more samples per second than one
# two-thread process). The step counts and per-rank batches of the shapes preset assume 2 ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUNS=${RUNS:-runs}
NPROC=${NPROC:-2}
COMMON=(--preset shapes --name shapes --runs-dir "$RUNS")
LATENTS="$RUNS/shapes/latents"
PORT=${PORT:-29511}
source scripts/stages.sh  # stage STAGE ...: one training stage on $NPROC ranks

one() { echo "== $*" >&2; "$PY" -m training.distill "$@" "${COMMON[@]}"; }

one vae --resume
stage precompute
# the teacher in two runs (version 3): version 1's 7000 steps, then 3500 more from its weights at lr 2e-4
stage teacher --data "$LATENTS" --out-dir "$RUNS/shapes/teacher-base" --resume
stage teacher --data "$LATENTS" --init "$RUNS/shapes/teacher-base/final.safetensors" --steps 3500 --lr 2e-4 --resume
# versions 4-5: a causal teacher fine-tuned from the bidirectional one, and the student distilled from it
# (its own ODE pairs and ODE init; DMD's critic mirrors it). Version 5: the causal teacher in two runs,
# 3500 steps at lr 2e-4 into teacher-causal-base, then 3500 more at 1e-4 into teacher-causal
stage teacher --kind causal --data "$LATENTS" --init "$RUNS/shapes/teacher/final.safetensors" --steps 3500 --lr 2e-4 \
      --out-dir "$RUNS/shapes/teacher-causal-base" --resume
stage teacher --kind causal --data "$LATENTS" --init "$RUNS/shapes/teacher-causal-base/final.safetensors" --steps 3500 \
      --lr 1e-4 --resume
stage ode-pairs --teacher-kind causal
stage ode-init --teacher-kind causal --resume
stage dmd --teacher-kind causal --resume
"$PY" -m training.export --name shapes --runs-dir "$RUNS" --dit dmd-causal-teacher --teacher teacher-causal
