#!/usr/bin/env bash
# The paper's Table 4 and Figure 8 in miniature on Shapes (docs/reproduction.md). Run after
# scripts/train_shapes.sh (which trains the shared VAE, latents, both teachers, and ours from the causal one).
# Every training stage resumes when the script is run again; evaluations are rewritten.
#
#   bash scripts/reproduce_shapes.sh          # figures go to $RUNS/shapes/eval/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUNS=${RUNS:-runs}
RUN="$RUNS/shapes"
COMMON=(--preset shapes --name shapes --runs-dir "$RUNS")
VAE="$RUN/vae-decoder/final.safetensors"  # the shipped decoder of versions 6-12, and the one Table 4 and Figure 8 compare
# every DiT through (versions 14-16 ship vae-student, fitted to ours: below); the VAE stage's own before it
[ -f "$VAE" ] || VAE="$RUN/vae/final.safetensors"
OUT="$RUN/eval"
PROMPTS=${PROMPTS:-64}
DRIFT_PROMPTS=${DRIFT_PROMPTS:-12}
mkdir -p "$OUT"

NPROC=${NPROC:-2}  # ranks of one thread each, as scripts/train_shapes.sh
PORT=${PORT:-29512}
source scripts/stages.sh  # stage STAGE ...: one training stage on $NPROC ranks

# Ablation trainings. The recipe (versions 5 to 11) already made the causal teacher (fine-tuned from the
# bidirectional one) and the student initialised on its ODE pairs (shipped since version 6).
stage ode-pairs                                                   # the bidirectional teacher's pairs
stage ode-init --clean-chunks 0 --resume                          # ODE init only (as Table 4's rows were trained)
stage dmd --resume                                                # ODE init + bidirectional teacher
stage dmd --skip-ode-init --resume                                # few-step causal without ODE init
stage dmd --teacher-kind causal --resume                          # ODE init + causal teacher: the paper's method
# EQUAL_BUDGET=1: also a causal teacher from scratch with the bidirectional teacher's budget (7000 + 3500
# steps, about 80 min; version 3's comparison in docs/reproduction.md)
if [ "${EQUAL_BUDGET:-0}" = 1 ]; then
  stage teacher --kind causal --data "$RUN/latents" --out-dir "$RUN/teacher-causal-scratch-base" --resume
  stage teacher --kind causal --data "$RUN/latents" --init "$RUN/teacher-causal-scratch-base/final.safetensors" \
        --steps 3500 --lr 2e-4 --out-dir "$RUN/teacher-causal-scratch" --resume
fi

ev() { local name=$1; shift; "$PY" -m training.eval "$@" --vae "$VAE" --json "$OUT/$name.json"; }

# Table 4: 64 prompts covering the vocabulary, 2 s (33 frames, the teacher's training length).
ev table4-teacher --teacher "$RUN/teacher/final.safetensors" --prompts "$PROMPTS" --seconds 2.0625
ev table4-causal-teacher --teacher "$RUN/teacher-causal/final.safetensors" --causal-chunk 3 \
   --prompts "$PROMPTS" --seconds 2.0625
if [ "${EQUAL_BUDGET:-0}" = 1 ]; then
  ev table4-causal-teacher-scratch --teacher "$RUN/teacher-causal-scratch/final.safetensors" --causal-chunk 3 \
     --prompts "$PROMPTS" --seconds 2.0625
fi
ev table4-no-ode-init --model "$RUN/dmd-no-ode-init/final.safetensors" --prompts "$PROMPTS" --seconds 2.0625
ev table4-ode-init --model "$RUN/ode-init/final.safetensors" --prompts "$PROMPTS" --seconds 2.0625
ev table4-ode-init-causal --model "$RUN/ode-init-causal-teacher/final.safetensors" --prompts "$PROMPTS" \
   --seconds 2.0625
ev table4-bidirectional-dmd --model "$RUN/dmd/final.safetensors" --prompts "$PROMPTS" --seconds 2.0625
ev table4-causal-dmd --model "$RUN/dmd-causal-teacher/final.safetensors" --prompts "$PROMPTS" --seconds 2.0625

# Figure 8: the three figures per 5 s window over 2 minutes.
ev drift-teacher --teacher "$RUN/teacher/final.safetensors" --teacher-steps 20 --prompts "$DRIFT_PROMPTS" \
   --seconds 120 --drift "$OUT/drift-teacher.png"
ev drift-ours --model "$RUN/ode-init-causal-teacher/final.safetensors" --prompts "$DRIFT_PROMPTS" \
   --seconds 120 --drift "$OUT/drift-ours.png"
ev drift-bidirectional-dmd --model "$RUN/dmd/final.safetensors" --prompts "$DRIFT_PROMPTS" --seconds 120 \
   --drift "$OUT/drift-bidirectional-dmd.png"
ev drift-causal-dmd --model "$RUN/dmd-causal-teacher/final.safetensors" --prompts "$DRIFT_PROMPTS" --seconds 120 \
   --drift "$OUT/drift-causal-dmd.png"
"$PY" -m training.eval --compare "$OUT/drift-teacher.json=bidirectional teacher, sliding windows" \
   "$OUT/drift-ours.json=ODE init from the causal teacher (ours, shipped)" \
   "$OUT/drift-causal-dmd.json=ODE init + causal teacher (DMD)" \
   "$OUT/drift-bidirectional-dmd.json=ODE init + bidirectional teacher" --drift "$OUT/figure8.png"

# Versions 14 to 16 ship a decoder fine-tuned on ours' own latents (vae-student): ours through it, beside the rows
# above, which compare the DiTs through vae-decoder (none of them was fitted to it)
OWN="$RUN/vae-student/final.safetensors"
if [ -f "$OWN" ]; then
  "$PY" -m training.eval --model "$RUN/ode-init-causal-teacher/final.safetensors" --vae "$OWN" --prompts "$PROMPTS" \
     --seconds 2.0625 --json "$OUT/table4-ours-own-decoder.json"
  "$PY" -m training.eval --model "$RUN/ode-init-causal-teacher/final.safetensors" --vae "$OWN" \
     --prompts "$DRIFT_PROMPTS" --seconds 120 --json "$OUT/drift-ours-own-decoder.json" \
     --drift "$OUT/drift-ours-own-decoder.png"
else
  OWN="$VAE"
fi

# Zero-shot applications of ours, through the decoder it ships with.
"$PY" -m training.zero_shot --model "$RUN/ode-init-causal-teacher/final.safetensors" --vae "$OWN" \
   --json "$OUT/zero-shot.json"
