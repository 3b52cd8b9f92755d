# Sourced by the recipe scripts (train_shapes.sh, reproduce_shapes.sh): `stage STAGE
# ...` runs `python -m training.distill STAGE ... ${COMMON[@]}` on $NPROC ranks of one thread each
# (torchrun on 127.0.0.1:$PORT), or in one process when NPROC is 1. Needs PY, NPROC, PORT and COMMON.
LAUNCH=("$PY")
if [ "$NPROC" -gt 1 ]; then
  LAUNCH=(env OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_addr 127.0.0.1
          --master_port "$PORT")
fi
stage() { echo "== $* (ranks: $NPROC)" >&2; "${LAUNCH[@]}" -m training.distill "$@" "${COMMON[@]}"; }
