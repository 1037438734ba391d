#!/usr/bin/env bash
# The GPU measurements, a few steps per command: a lent machine runs a command for 10 minutes at
# most and brings back 8 files of $OUT (benchmarks/README.md, "The next loans"):
#   STEPS="pallas mosaic" TAG=_<kind> bash benchmarks/gpu_session.sh
#   STEPS="lm lra device" TAG=_<kind> bash benchmarks/gpu_session.sh
#   STEPS=mosaic_lra TAG=_<kind> bash benchmarks/gpu_session.sh
#   TTA_ONLY=1 TTA_PREPARE=1 TTA_MINUTES=0 bash benchmarks/gpu_session.sh   # ListOps data, runner
#   TTA_ONLY=1 TTA_MODELS=hgrn bash benchmarks/gpu_session.sh               # one 8-minute run
# STEPS names the steps (below; `all` is every one, time to accuracy included, for a machine of
# one's own with SESSION_LIMIT_S raised); without STEPS or TTA_ONLY=1 it runs nothing. Results:
# benchmarks/results/*<TAG>_gpu.json ($HGRN_BENCH_RESULTS when set), packed with this command's
# logs into $OUT/results.tar.gz (its only file) after every step, so that a command killed midway
# still brings back what finished. Each step has a time limit, cut to what is left of
# SESSION_LIMIT_S (default 580 s, under a lent machine's 600 s per command; the log says when a
# step is cut or skipped), so one slow step leaves time to pack the others' results. A step that
# fails, times out or finds no time left makes the command exit 1, naming it in the last line.
# Python packages the image lacks are installed from wheels in .whl/ when present (below).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/hgrn_gpu_session}
PY=${PYTHON:-python3}
RESULTS=${HGRN_BENCH_RESULTS:-benchmarks/results}
TAG=${TAG:-}
SESSION_LIMIT_S=${SESSION_LIMIT_S:-580}
ALL_STEPS="pallas mosaic matrix peers lm lra device mosaic_lra tta"
LOAN_COMMANDS='STEPS="pallas mosaic" TAG=_<kind>; STEPS="lm lra device" TAG=_<kind>; STEPS=mosaic_lra TAG=_<kind>; TTA_ONLY=1 TTA_PREPARE=1 TTA_MINUTES=0; TTA_ONLY=1 TTA_MODELS=hgrn'
log() { echo "=== $(date +%T) $*"; }
die() {
  echo "gpu_session.sh: $*" >&2
  exit 2
}

# What this command runs: the steps of STEPS ("tta" is the time-to-accuracy runs; TTA_ONLY=1 is
# STEPS=tta). Checked before anything starts: a misspelt step would otherwise be left out.
if [ "${TTA_ONLY:-0}" = 1 ]; then
  [ -z "${STEPS-}" ] || [ "$STEPS" = tta ] \
    || die "TTA_ONLY=1 runs the time-to-accuracy runs alone, but STEPS=\"$STEPS\" is set too: drop one of them (or add tta to STEPS)"
  STEPS=tta
elif [ -z "${STEPS+set}" ]; then
  die "say which steps to run, one lent machine's command at a time: $LOAN_COMMANDS (benchmarks/README.md, 'The next loans'); STEPS=all runs every step, about 50 minutes with SESSION_LIMIT_S=3600"
fi
[ "$STEPS" = all ] && STEPS=$ALL_STEPS
for name in $STEPS; do
  [[ " $ALL_STEPS " == *" $name "* ]] || die "STEPS: no step '$name'; choose from: $ALL_STEPS (or all)"
done
if [ -z "${STEPS// /}" ] && [ "${TTA_PREPARE:-0}" != 1 ]; then
  die "STEPS is empty and TTA_PREPARE is not 1: nothing to run; name steps from: $ALL_STEPS"
fi
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
for variable in SESSION_LIMIT_S TTA_MINUTES TTA_SECONDS TTA_OVERHEAD_S; do
  value=${!variable:-0}
  [[ $value =~ ^[0-9]+$ ]] || die "$variable=$value: give a whole number of $([ "$variable" = TTA_MINUTES ] && echo minutes || echo seconds)"
done

# Time to accuracy (issue 14), see below: its data (about 98k ListOps sequences, two minutes of one
# CPU core) are generated in the background while the GPU steps run. TTA_PREPARE=1 generates them
# even when this command runs no model (TTA_MINUTES=0), for the next command on the warm machine.
# (10#: whole numbers in base 10, so that 08 is 8 seconds and not an error, 010 not 8.)
SESSION_LIMIT_S=$((10#$SESSION_LIMIT_S))
TTA=$((10#${TTA_MINUTES:-8}))
budget=$((10#${TTA_SECONDS:-$((TTA * 60))}))
TTA_DIR=${TTA_DIR:-$RESULTS/listops_time_to_accuracy_gpu}
TTA_CACHE=${TTA_CACHE:-cache}
# The runs' own folders (checkpoints included) stay out of $OUT. Each run gets a folder of its
# own (<model>-<date>-<time>): a folder of an earlier run on a warm machine would be resumed, and
# its old results.json returned.
TTA_WORK=${TTA_WORK:-/tmp/hgrn_tta}
STAMP=$(date +%Y%m%d-%H%M%S)
fresh_dir() {
  local dir="$1-$STAMP" n=1
  while [ -e "$dir" ]; do
    n=$((n + 1))
    dir="$1-$STAMP-$n"
  done
  echo "$dir"
}

# A GPU session on a CPU would run the kernels in Pallas's interpreter and train the 8-minute
# time-to-accuracy runs on the CPU, and overwrite the *_cpu.json results: stop at once instead.
if [ "${ALLOW_CPU:-0}" != 1 ] && ! $PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "gpu_session.sh: JAX sees no GPU here; run it on a GPU machine (ALLOW_CPU=1 runs it anyway)" >&2
  exit 2
fi

# This command's logs go into the tarball, not loose into $OUT (which brings back 8 files).
LOG_DIR=${LOG_DIR:-$RESULTS/logs${TAG}_$STAMP}
mkdir -p "$OUT" "$LOG_DIR" || die "cannot make OUT=$OUT or LOG_DIR=$LOG_DIR: set them to writable folders"
exec > >(tee -a "$LOG_DIR/session.log") 2>&1
FAILED=()
SHORTENED=()
# Seconds kept back from SESSION_LIMIT_S for the last step's kill (timeout -k 5) and the tarball;
# a step with less than MIN_STEP_S left is skipped.
RESERVE_S=10
MIN_STEP_S=20
left_s() { echo $((SESSION_LIMIT_S - SECONDS - RESERVE_S)); }

# results.tar.gz in $OUT, rebuilt quietly after every step: the JSON and plots of $RESULTS, the
# time-to-accuracy runs and this command's logs. Made beside and moved in, so that a command
# killed while packing leaves the previous tarball whole.
pack() {
  local part="${TMPDIR:-/tmp}/hgrn_gpu_session.$$.tar.gz" files
  shopt -s nullglob
  files=("$RESULTS"/*_gpu.json "$RESULTS"/*_gpu.png "$LOG_DIR")
  shopt -u nullglob
  [ -d "$TTA_DIR" ] && files+=("$TTA_DIR")
  # GNU tar exits 1 when a file changed while read (a log still written by a step in the
  # background): the archive is whole, with that file as it was.
  local rc=0
  tar -czf "$part" "${files[@]}" 2>/dev/null || rc=$?
  if [ "$rc" -le 1 ]; then
    mv -f "$part" "$OUT/results.tar.gz"
  else
    log "results.tar.gz could not be rebuilt (tar exit $rc); the previous one stays"
    FAILED+=("packing (tar exit $rc)")
    rm -f "$part"
  fi
}

# step NAME LIMIT COMMAND...: COMMAND under LIMIT seconds, cut to what is left of SESSION_LIMIT_S
# (skipped with under MIN_STEP_S left), its output in $LOG_DIR/NAME.log; a failure is recorded
# for the last line, and the tarball rebuilt (in the foreground).
step() {
  local name=$1 limit=$2 left rc
  shift 2
  left=$(left_s)
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    log "$name: skipped, ${left} s left of SESSION_LIMIT_S=${SESSION_LIMIT_S} (${SECONDS} s gone)"
    FAILED+=("$name (skipped: no time left)")
    return 1
  fi
  if [ "$limit" -gt "$left" ]; then
    log "$name: limit cut from $limit s to $left s, what is left of SESSION_LIMIT_S=${SESSION_LIMIT_S} (${SECONDS} s gone)"
    limit=$left
  fi
  log "$name (limit ${limit} s): $*"
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  log "$name: exit $rc"
  case $rc in
    0) ;;
    124) FAILED+=("$name (timed out at $limit s)") ;;
    *) FAILED+=("$name (exit $rc)") ;;
  esac
  [ "$BASHPID" = "$$" ] && pack
  return "$rc"
}

log "environment (steps: ${STEPS:-none}${TAG:+, tag $TAG}; SESSION_LIMIT_S=$SESSION_LIMIT_S; logs in $LOG_DIR, packed into $OUT/results.tar.gz)"
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
pack

data_pid=
data_limit=600
if { wanted tta && [ "$budget" != 0 ]; } || [ "${TTA_PREPARE:-0}" = 1 ]; then
  [ "$data_limit" -gt "$(left_s)" ] && data_limit=$(left_s)
  step tta_data "$data_limit" $PY -m hgrn_jax.data.listops --spec=lra --cache_dir="$TTA_CACHE" &
  data_pid=$!
fi
# The measurement steps, in this order; a lent machine's 15 minutes hold them in three commands
# (STEPS="pallas mosaic", STEPS="lm lra device", STEPS=mosaic_lra), or one 8-minute
# time-to-accuracy run and little else. TAG names this machine's JSON files (e.g. TAG=_h200), so
# earlier ones stay.
#
# The kernel: checks against the pure-JAX methods, time against the memory floor at 4k/16k/64k in
# float32 and bfloat16 for three variants (the defaults, whose loads now go ahead of their
# stores; "loads after stores", the kernel timed on the H200 of 2026-11-30; "chain in kernel",
# off until timed), a profiler trace of each at 4k (kernels and device time per call), and a
# sweep of launch parameters at 4k and 64k. A variant that fails is recorded and the others go on.
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
  --methods chunked pallas --sizes 8x1024x4x64x64 8x4096x4x64x64 4x16384x4x64x64 --tag "$TAG"
# fla's kernels and layer (only when fla is installed from .whl/; without it the step is left out,
# as peers_gpu.py itself would skip it).
if wanted peers; then
  if $PY -c "import fla" 2>/dev/null; then
    step peers 200 $PY benchmarks/peers_gpu.py --reps 5 --deadline 150 --tag "$TAG"
  else
    log "peers: left out, fla does not import (put its wheels in .whl/)"
  fi
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
    --workdir="$(fresh_dir "$TTA_WORK/tiny")" --config.data.source=generated \
    --config.data.cache_dir="$TTA_CACHE"
fi
# Time to accuracy (issue 14; the step "tta", or TTA_ONLY=1): the full ListOps configuration on
# generated data of the LRA specification, HGRN and the same-size Transformer
# (listops.py:transformer: attention in place of the HGRU), TTA_MINUTES each (default 8;
# TTA_SECONDS overrides; compilation included), then the accuracy curves against training time
# in one plot. TTA_MINUTES=0 runs no model. A lent machine's command (SESSION_LIMIT_S) holds one
# 8-minute run, not two: TTA_MODELS picks the runs of this command (default both; e.g.
# TTA_ONLY=1 TTA_MODELS=hgrn, then TTA_MODELS=transformer on the next machine). A run whose
# budget and TTA_OVERHEAD_S (starting, opening the data, testing; default 60 s) do not fit in
# what is left has its training budget cut (logged, and named in the last line). Each run is
# kept as a run folder under $RESULTS (commit it), so the plot holds every model run so far,
# this session's and earlier ones. The data go to TTA_CACHE (default cache/, ignored by git,
# kept on a warm machine between commands), so one command can generate them (TTA_PREPARE=1 or
# TTA_MODELS=) and the next run a model within its 10-minute limit.
if [ -n "$data_pid" ]; then
  wait "$data_pid"
  rc=$?
  [ "$rc" = 0 ] || FAILED+=("tta_data (exit $rc)")
  pack
fi
TTA_OVERHEAD_S=$((10#${TTA_OVERHEAD_S:-60}))
if wanted tta && [ "$budget" != 0 ]; then
  for model in ${TTA_MODELS-hgrn transformer}; do
    preset=$([ "$model" = transformer ] && echo ":transformer" || echo "")
    work=$(fresh_dir "$TTA_WORK/$model")
    left=$(left_s)
    limit=$((budget + 240))
    if [ "$limit" -gt "$left" ]; then
      log "tta_$model: limit cut from $limit s to $left s, what is left of SESSION_LIMIT_S=${SESSION_LIMIT_S} (${SECONDS} s gone)"
      limit=$left
    fi
    train=$budget
    if [ $((train + TTA_OVERHEAD_S)) -gt "$limit" ]; then
      train=$((limit - TTA_OVERHEAD_S))
      if [ "$train" -lt "$MIN_STEP_S" ]; then
        log "tta_$model: skipped, ${left} s left of SESSION_LIMIT_S=${SESSION_LIMIT_S} (${SECONDS} s gone): too little to train"
        FAILED+=("tta_$model (skipped: no time left)")
        continue
      fi
      log "tta_$model: training budget cut from $budget s to $train s, to fit the ${left} s left of SESSION_LIMIT_S=${SESSION_LIMIT_S}"
      SHORTENED+=("tta_$model trained $train of $budget s")
    fi
    if step "tta_$model" "$limit" $PY -m experiments.train \
      --config=experiments/configs/lra/listops.py$preset --workdir="$work" \
      --config.data.source=generated --config.data.cache_dir="$TTA_CACHE" \
      --config.max_train_time_s="$train" --config.eval_every=100 --config.checkpoint_every=100; then
      if [ -f "$work/results.json" ]; then
        mkdir -p "$TTA_DIR/$model"
        cp "$work"/{results.json,metrics.jsonl,config.json} "$TTA_DIR/$model/" \
          || FAILED+=("tta_$model (its files were not copied from $work)")
      else
        FAILED+=("tta_$model (no results.json in $work)")
      fi
      pack
    fi
  done
  if [ -d "$TTA_DIR" ]; then
    step tta_plot 60 $PY -m experiments.report "$TTA_DIR" --x time \
      --png "$RESULTS/listops_time_to_accuracy_gpu.png"
  fi
elif wanted tta; then
  log "time to accuracy: no model runs (TTA_MINUTES=0 or TTA_SECONDS=0)"
fi
pack
cut=
if [ "${#SHORTENED[@]}" -gt 0 ]; then
  printf -v cut '%s, ' "${SHORTENED[@]}"
  cut="; cut: ${cut%, }"
fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  printf -v failed '%s; ' "${FAILED[@]}"
  log "done, results so far in $OUT/results.tar.gz$cut; failed: ${failed%; }"
  exit 1
fi
log "done$cut"
