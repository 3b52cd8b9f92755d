#!/usr/bin/env bash
# The candidate recipe for the next embedded Shapes model, under test (docs/reproduction.md, The VAE):
# session 14's code VAE (shape, direction and colour coded into the latent, about 64 min on 2 cores),
# then version 5's DiT stages with the causal teacher started from the 7000-step bidirectional teacher
# (no 3500-step continuation), so that the whole recipe fits the 3-hour budget. It does not export:
# evaluate first (the command it prints at the end) and ship with training.export only if it beats
# version 5 (scripts/train_shapes.sh, the shipped recipe).
#
#   RUNS=runs-next bash scripts/train_shapes_next.sh     # every stage resumes when run again
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUNS=${RUNS:-runs-next}
NPROC=${NPROC:-2}
V="$RUNS/shapes"
COMMON=(--preset shapes --name shapes --runs-dir "$RUNS")
LATENTS="$V/latents"
PORT=${PORT:-29513}
source scripts/stages.sh  # stage STAGE ...: one training stage on $NPROC ranks
finished() { [ -f "$1/final.safetensors" ]; }
vae() {  # one VAE run into $1, skipped once finished (its final file carries the latent statistics)
  local out=$1; shift
  if finished "$out"; then echo "== $out: finished" >&2; return; fi
  echo "== vae -> $out" >&2
  "$PY" -m training.distill vae "${COMMON[@]}" --out-dir "$out" --resume "$@"
}

# the VAE: version 2's two frame runs, the code phase on frames, one clip phase with all three codes
C=(--mask-weight 1 --guide colour --stats-samples 16)
vae "$V/vae-images" "${C[@]}" --steps 800 --image-steps 800 --lr 2e-4 --guide-steps 800
vae "$V/vae-colour" "${C[@]}" --init "$V/vae-images/final.safetensors" --steps 300 --image-steps 300 --lr 2e-4 \
    --lr-warmup 20 --guide-steps 300 --colour-weight 10
S=(--mask-weight 1 --guide colour --colour-weight 10 --lr-warmup 50 --stats-samples 16 --skip-grad-norm 1000)
M=(--shape-weight 3 --motion-weight 3 --object-colour-weight 1 --colour-code-weight 3)
vae "$V/vae-code" "${S[@]}" --shape-weight 10 --colour-code-weight 10 --init "$V/vae-colour/final.safetensors" \
    --steps 1500 --image-steps 1500 --guide-steps 1500 --lr 2e-4
vae "$V/vae" "${S[@]}" "${M[@]}" --init "$V/vae-code/final.safetensors" --steps 1500 --image-steps 0 \
    --guide-steps 1500 --lr 1e-4   # frames-only init: the temporal layers are inflated at step 0

# the DiT: latents, the bidirectional teacher, the causal teacher in two runs, ODE pairs, ODE init, DMD
[ -f "$LATENTS/.complete" ] || { stage precompute; touch "$LATENTS/.complete"; }
finished "$V/teacher-base" || stage teacher --data "$LATENTS" --out-dir "$V/teacher-base" --resume
finished "$V/teacher-causal-base" || stage teacher --kind causal --data "$LATENTS" \
    --init "$V/teacher-base/final.safetensors" --steps 3500 --lr 2e-4 --out-dir "$V/teacher-causal-base" --resume
finished "$V/teacher-causal" || stage teacher --kind causal --data "$LATENTS" \
    --init "$V/teacher-causal-base/final.safetensors" --steps 3500 --lr 1e-4 --resume
stage ode-pairs --teacher-kind causal
stage ode-init --teacher-kind causal --resume
stage dmd --teacher-kind causal --resume
echo "== done; evaluate against version 5 with:" >&2
echo "$PY -m training.eval --model $V/dmd-causal-teacher/final.safetensors --vae $V/vae/final.safetensors" \
     "--prompts 64 --seconds 2.0625 --json $V/eval-next.json" >&2
