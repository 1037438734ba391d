#!/usr/bin/env bash
# Every GPU measurement in one go, for a machine lent for a few minutes (see benchmarks/README.md):
#   bash benchmarks/gpu_session.sh        # results: benchmarks/results/*_gpu.json, logs in $OUT
# Each step has its own time limit, so one slow or failing step leaves the others' results.
# Python packages the image lacks are installed from wheels in .whl/ when present (below).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/hgrn_gpu_session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
log() { echo "=== $(date +%T) $*"; }

# A GPU session on a CPU would run the kernels in Pallas's interpreter and train the 8-minute
# time-to-accuracy runs on the CPU, and overwrite the *_cpu.json results: stop at once instead.
if [ "${ALLOW_CPU:-0}" != 1 ] && ! $PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "gpu_session.sh: JAX sees no GPU here; run it on a GPU machine (ALLOW_CPU=1 runs it anyway)" >&2
  exit 2
fi

log environment
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
# Wheels put in .whl/ (carried; ignored by git): the packages of requirements.txt that the image
# lacks (ml_collections, grain, array_record, portpicker, tensorboardX; their pins), and fla for
# peers_gpu.py. jax, flax, optax, orbax-checkpoint and chex stay the image's: on an H200 image of
# 2026-11-30 (jax 0.11.2, flax 0.12.10) our pinned flax 0.12.8 did not import (jax.experimental.
# hijax has no HiPrimitive there), and the image's flax runs everything here.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/hgrn_site .whl/*.whl \
    && export PYTHONPATH=/tmp/hgrn_site
fi
smoke='from flax import nnx; from hgrn_jax.nn import HGRNLM, LMConfig
HGRNLM(LMConfig(vocab_size=16, features=16, num_layers=1, glu_expand=1), rngs=nnx.Rngs(0))'
$PY -c "$smoke" || log "our modules cannot be built with these packages (see above)"
$PY -c "import jax, flax, sys; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
$PY -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', getattr(fla, '__version__', '?'))" 2>/dev/null \
  || log "torch, triton or fla is not installed: peers_gpu.py times our kernels without fla's"

step() {
  local name=$1 limit=$2; shift 2
  log "$name (limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  log "$name: exit ${PIPESTATUS[0]}"
}
# Time to accuracy (issue 14), see below: its data (about 98k ListOps sequences, two minutes of one
# CPU core) are generated in the background while the GPU steps run. TTA_PREPARE=1 generates them
# even when this command runs no model (TTA_MINUTES=0), for the next command on the warm machine.
TTA=${TTA_MINUTES:-8}
budget=${TTA_SECONDS:-$((TTA * 60))}
TTA_DIR=${TTA_DIR:-benchmarks/results/listops_time_to_accuracy_gpu}
TTA_CACHE=${TTA_CACHE:-cache}
# The runs' own folders (checkpoints included) stay out of $OUT, which brings back 8 files at most.
TTA_WORK=${TTA_WORK:-/tmp/hgrn_tta}
data_pid=
if [ "$budget" != 0 ] || [ "${TTA_PREPARE:-0}" = 1 ]; then
  step tta_data 600 $PY -m hgrn_jax.data.listops --spec=lra --cache_dir="$TTA_CACHE" &
  data_pid=$!
fi
# STEPS picks the measurement steps below (default: all of them, in this order); a lent machine's
# 15 minutes hold them in two commands (STEPS="pallas mosaic", then STEPS="lm lra device"), or
# one 8-minute time-to-accuracy run and little else. TTA_ONLY=1 is STEPS="". TAG names this
# machine's JSON files (e.g. TAG=_h200), so earlier ones stay.
STEPS=${STEPS-pallas mosaic matrix peers lm lra device mosaic_lra}
[ "${TTA_ONLY:-0}" = 1 ] && STEPS=
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
TAG=${TAG:-}
# The kernel: checks against the pure-JAX methods, time against the memory floor at 4k/16k/64k in
# float32 and bfloat16 for three variants (the defaults, whose loads now go ahead of their
# stores; "loads after stores", the kernel timed on the H200 of 2026-11-30; "chain in kernel",
# off until timed), a profiler trace of each at 4k (kernels and device time per call), and a
# sweep of launch parameters at 4k and 64k.
wanted pallas && step pallas 240 $PY benchmarks/pallas_gpu.py --reps 5 --deadline 200 --tag "$TAG"
# The same kernels on Mosaic GPU (jax 0.11 deprecates Pallas's Triton back-end; untimed when
# written, checked on CPU in Mosaic GPU's interpret mode only), in a step of their own so that a
# failure to compile there costs no other step: the checks, then the floor ratios at 4k/16k/64k
# beside the default (Triton) kernel and with Mosaic GPU's automatic barriers (a bar.sync before
# and after every shared-memory store) in the same run, all traced at 4k, then a sweep of the
# Mosaic GPU kernels' options in float32 until 170 s.
wanted mosaic && step mosaic 200 $PY benchmarks/pallas_gpu.py --reps 5 \
  --variants default mosaic_gpu "mosaic_gpu, auto barriers" --sweep-base mosaic_gpu \
  --sweep-dtypes float32 --deadline 170 --tag "${TAG}_mosaic"
# HGRN2's matrix recurrence: chunked and the Pallas kernel (both checked against the scan first;
# the scan itself, a launch per step, took 38 / 140 / 556 ms forward+backward at these sizes on
# an H200 and is not timed), HGRN's recurrence, causal attention, and fla's chunk_gla when fla
# imports.
wanted matrix && step matrix 90 $PY benchmarks/matrix_recurrence.py --reps 3 \
  --methods chunked pallas --sizes 8x1024x4x64x64 8x4096x4x64x64 4x16384x4x64x64
# fla's kernels and layer (only when fla is installed from .whl/).
if wanted peers && $PY -c "import fla" 2>/dev/null; then
  step peers 200 $PY benchmarks/peers_gpu.py --reps 5 --deadline 150
fi
# Training steps against the same-size Transformer, at each model's training batch size: the LM
# (WikiText-103 size, 8 x L tokens; one HGRN row per recurrence method, "auto" being associative
# below 2k steps and pallas from 2k, and the kernel's variants above) and the LRA Text
# classifier (batch 32; auto and pallas, each also with its bidirectional mixer's directions
# the other way than its default: XLA's scans now merge the two scans into one call, which
# compiled for an H200 cuts the 1k step from 587 to 535 kernels (benchmarks/gpu_compile.py),
# the Pallas kernel does not; the kernel's chained variants; and the step as the H200 of
# 2026-11-30 timed it, before the changes chosen without a GPU (two scans, autodiff's BatchNorm
# gradient, each direction's phases alone, the kernel's loads after its stores): 587 -> 490
# kernels at 1k. On that H200 HGRN's 1k step was 0.97x the Transformer's). The LRA L = 4k row
# was measured on 2026-11-30 (2.83x) and is not repeated. A merge variant that repeats a row's
# default is left out.
kernels=("loads after stores" "chained kernel")
wanted lm && step lm 200 $PY benchmarks/train_throughput.py --full --batch 8 \
  --lengths 1024 2048 --methods pallas associative --variants after "${kernels[@]}" \
  --reps 5 --tag "$TAG"
wanted lra && step lra 220 $PY benchmarks/train_throughput.py --task lra --full --batch 32 \
  --lengths 1024 2048 --methods auto pallas --variants after "as timed on the H200" \
  "directions in two scans" "directions in one scan" "chained kernel" \
  "chained kernel, directions in one scan" --reps 5 --tag "$TAG"
# Is that 1k step launch-bound? Device time (kernels running) against step time, and the
# kernels per step, from a profiler trace.
wanted device && step device 120 $PY benchmarks/device_time.py --task lra --full --batch 32 \
  --lengths 1024 --methods auto pallas \
  --variants after "directions in two scans" "directions in one scan" \
  "chained kernel, directions in one scan" \
  --tag "$TAG"
# The LRA Text classifier's training step with the Mosaic GPU kernels, beside the Triton ones and
# the Transformer in the same run (its own step, as above).
wanted mosaic_lra && step mosaic_lra 150 $PY benchmarks/train_throughput.py --task lra --full \
  --batch 32 --lengths 1024 2048 --methods pallas --variants after "mosaic_gpu kernel" --reps 5 \
  --tag "${TAG}_mosaic"
# The runner on this machine before a later command spends its minutes on it: the tiny ListOps
# preset, end to end (data, training, checkpoints, evaluation).
if [ "${TTA_PREPARE:-0}" = 1 ]; then
  step runner 90 $PY -m experiments.train --config=experiments/configs/lra/listops.py:tiny \
    --workdir="$TTA_WORK/tiny" --config.data.source=generated --config.data.cache_dir="$TTA_CACHE"
fi
# Time to accuracy (issue 14): the full ListOps configuration on generated data of the LRA
# specification, HGRN and the same-size Transformer (listops.py:transformer: attention in place
# of the HGRU), TTA_MINUTES each (default 8; TTA_SECONDS overrides; compilation included), then
# the accuracy curves against training time in one plot. Set TTA_MINUTES=0 to skip. A lent
# machine's 15 minutes (start-up included) hold one 8-minute run, not two: TTA_MODELS picks the
# runs of this session (default both; e.g. TTA_ONLY=1 TTA_MODELS=hgrn, then
# TTA_MODELS=transformer on the next machine). Each run is kept as a run folder under
# benchmarks/results/ (commit it), so the plot holds every model run so far, this session's and
# earlier ones. The data go to TTA_CACHE (default cache/, ignored by git, kept on a warm machine
# between commands), so one command can generate them (TTA_PREPARE=1 or TTA_MODELS=) and the
# next run a model within its 10-minute limit.
if [ -n "$data_pid" ]; then
  wait "$data_pid"
fi
if [ "$budget" != 0 ]; then
  for model in ${TTA_MODELS-hgrn transformer}; do
    preset=$([ "$model" = transformer ] && echo ":transformer" || echo "")
    step "tta_$model" $((budget + 240)) $PY -m experiments.train \
      --config=experiments/configs/lra/listops.py$preset --workdir="$TTA_WORK/$model" \
      --config.data.source=generated --config.data.cache_dir="$TTA_CACHE" \
      --config.max_train_time_s=$budget --config.eval_every=100 --config.checkpoint_every=100
    if [ -f "$TTA_WORK/$model/results.json" ]; then
      mkdir -p "$TTA_DIR/$model"
      cp "$TTA_WORK/$model"/{results.json,metrics.jsonl,config.json} "$TTA_DIR/$model/"
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
