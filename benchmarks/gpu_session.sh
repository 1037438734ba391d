#!/usr/bin/env bash
# Every GPU measurement in one go, for a machine lent for a few minutes (see benchmarks/README.md):
#   bash benchmarks/gpu_session.sh        # results: benchmarks/results/*_gpu.json, logs in $OUT
# Each step has its own time limit, so one slow or failing step leaves the others' results.
# fla (flash-linear-attention 0.6.0 + fla-core) is installed from wheels in .whl/ when present.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/hgrn_gpu_session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
log() { echo "=== $(date +%T) $*"; }

log environment
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
if ls .whl/fla_core-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/hgrn_site \
    .whl/fla_core-*.whl .whl/flash_linear_attention-*.whl && export PYTHONPATH=/tmp/hgrn_site
fi
smoke='from flax import nnx; from hgrn_jax.nn import HGRNLM, LMConfig
HGRNLM(LMConfig(vocab_size=16, features=16, num_layers=1, glu_hidden=16), rngs=nnx.Rngs(0))'
if ! $PY -c "$smoke" && ls .whl/flax-*.whl >/dev/null 2>&1; then
  log "installed flax cannot build our modules: using the pinned flax wheel"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/hgrn_flax .whl/flax-*.whl
  export PYTHONPATH=/tmp/hgrn_flax:${PYTHONPATH:-}
fi
$PY -c "import jax, flax, sys; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
$PY -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', getattr(fla, '__version__', '?'))"

step() {
  local name=$1 limit=$2; shift 2
  log "$name (limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  log "$name: exit ${PIPESTATUS[0]}"
}
# TTA_ONLY=1: only the time-to-accuracy runs at the end (a lent machine's 15 minutes hold one
# pair of 8-minute runs and little else).
if [ "${TTA_ONLY:-0}" != 1 ]; then
step pallas 100 $PY benchmarks/pallas_gpu.py --reps 5
# HGRN2's matrix recurrence: every method (the Pallas kernel compiled for the first time here,
# checked against the scan first), HGRN's recurrence, causal attention, and fla's chunk_gla
# when fla imports.
step matrix 150 $PY benchmarks/matrix_recurrence.py --reps 5
step peers 200 $PY benchmarks/peers_gpu.py --reps 5 --deadline 150
step lm 110 $PY benchmarks/train_throughput.py --full --lengths 1024 4096 16384 \
  --methods pallas chunked --reps 3
step lra 70 $PY benchmarks/train_throughput.py --task lra --full --lengths 1024 4096 16384 \
  --methods pallas chunked --reps 3
fi
# Time to accuracy (issue 14): the full ListOps configuration on generated data of the LRA
# specification, HGRN and the same-size Transformer (listops.py:transformer: attention in place
# of the HGRU), TTA_MINUTES each (default 8, compilation included), then the accuracy curves
# against training time in one plot. Set TTA_MINUTES=0 to skip. A lent machine's 15 minutes
# (start-up included) hold one 8-minute run, not two: TTA_MODELS picks the runs of this session
# (default both; e.g. TTA_ONLY=1 TTA_MODELS=hgrn, then TTA_MODELS=transformer on the next
# machine). Each run is kept as a run folder under benchmarks/results/ (commit it), so the plot
# holds every model run so far, this session's and earlier ones. The data go to TTA_CACHE
# (default cache/, ignored by git, kept on a warm machine between commands), so one command can
# generate them (TTA_ONLY=1 TTA_MODELS=) and the next run a model within its 10-minute limit.
TTA=${TTA_MINUTES:-8}
TTA_DIR=${TTA_DIR:-benchmarks/results/listops_time_to_accuracy_gpu}
TTA_CACHE=${TTA_CACHE:-cache}
if [ "$TTA" != 0 ]; then
  budget=$((TTA * 60))
  # The data first (about 98k sequences, a few minutes of one CPU core), outside the runs' limits.
  step tta_data 600 $PY -m hgrn_jax.data.listops --spec=lra --cache_dir="$TTA_CACHE"
  for model in ${TTA_MODELS-hgrn transformer}; do
    preset=$([ "$model" = transformer ] && echo ":transformer" || echo "")
    step "tta_$model" $((budget + 240)) $PY -m experiments.train \
      --config=experiments/configs/lra/listops.py$preset --workdir="$OUT/tta/$model" \
      --config.data.source=generated --config.data.cache_dir="$TTA_CACHE" \
      --config.max_train_time_s=$budget --config.eval_every=100 --config.checkpoint_every=100
    if [ -f "$OUT/tta/$model/results.json" ]; then
      mkdir -p "$TTA_DIR/$model"
      cp "$OUT/tta/$model"/{results.json,metrics.jsonl,config.json} "$TTA_DIR/$model/"
    fi
  done
  if [ -d "$TTA_DIR" ]; then
    step tta_plot 60 $PY -m experiments.report "$TTA_DIR" --x time \
      --png benchmarks/results/listops_time_to_accuracy_gpu.png
  fi
fi
tar czf "$OUT/results.tar.gz" benchmarks/results/*_gpu.json benchmarks/results/*_gpu.png \
  "$TTA_DIR"
log done
