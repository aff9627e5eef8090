#!/usr/bin/env bash
# The GPU checks, as one run of at most 8 minutes (docs/gpu.md): from the repository root,
# on a machine with a CUDA GPU and a CUDA build of torch (and optionally of jax):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else gpu-results
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]  # on the CPU, tiny sizes: checks the script end to end
#
# Steps, each under its own `timeout` (seconds in brackets, also capped so the whole run ends
# within TOTAL=480 s):
#   preflight one epoch of the CNN on 1000 images with --device gpu (the fast path and the
#             device-resident batches on CUDA); if it fails the script stops there, so a
#             broken set-up costs seconds, not the whole run                              [60]
#   env       GPU model, driver, torch / CUDA / Keras / JAX versions                       [20]
#   devices   --device gpu on torch and jax, --device cpu on torch, in parallel           [50]
#             (--dry-run: --device auto instead of gpu), and alongside them
#   syncs     synchronisations per step, stock Keras and the fast path, the CNN (syncs.py)  [50]
#   jax       the epoch benchmark on KERAS_BACKEND=jax (the keras/jax rows)                [60]
#   overhead  host ms/step at batch 8: stock Keras, fast path, PyTorch twin (overhead.py) [75]
#   bench     s/epoch at batch 128 against the twin, baseline-cnn mlp cnn (bench.py)      [75]
#   train     in parallel on the one GPU, each with what is left of TOTAL: the default
#             `python -m fmnist_keras.train` (MLP and CNN, with reports), `--model cnn-large`,
#             and the CNN at batch 512 with the rate scaled by sqrt(4) (a candidate GPU default)
# overhead and bench run alone; the other steps share the GPU and the CPU with the steps beside
# them, which inflates their wall times.
# A sampler reads nvidia-smi every second; summary.md gets the peak GPU memory of each step
# (the whole GPU's use during the step, and per process where nvidia-smi lists processes) and
# the GPU's mean utilisation during it. Everything goes to OUT_DIR: one log per step, the JSON
# of the benchmarks, the run directories and summary.md.
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && { DRY=1; shift; }
OUT_DIR=${1:-${OUT:-gpu-results}}
MARKER=.fmnist_keras-gpu-check
fail() { echo "gpu_check.sh: $*" >&2; exit 2; }
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX: peak, not 75% of the GPU
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/*.py import the package from the checkout
START=$(date +%s)
if [ "$DRY" = 1 ]; then
    TOTAL=${TOTAL:-900}  # a 2-core CPU needs longer even for the tiny sizes
    GPU=auto            # --device of the device-selection runs: auto picks the CPU here
    OVERHEAD_ARGS="--subset 200 --rounds 2 --threads 1"
    BENCH_ARGS="--subset 1000 --epochs 2 --threads 1"
    JAX_ARGS="--models mlp --subset 1000 --epochs 2"
    TRAIN_ARGS="--subset 600 --epochs 1"
    LARGE_ARGS="--subset 300 --epochs 1 --no-report"
    B512_ARGS="--subset 600 --epochs 1 --no-report"
    export CUDA_VISIBLE_DEVICES=""
else
    TOTAL=${TOTAL:-480}
    GPU=gpu
    OVERHEAD_ARGS="--rounds 3 --subset 2000"  # 225 steps of 8 per epoch and path
    BENCH_ARGS="--epochs 3 --subset 30000"
    JAX_ARGS="--models baseline-cnn mlp cnn --subset 20000 --epochs 2"
    TRAIN_ARGS=""
    LARGE_ARGS="--no-report"
    B512_ARGS="--no-report"
fi

# The output directory (data loss): the script empties steps.tsv, NAME.log, summary.md, ... there, so it
# writes only into a new or empty directory, which it marks with $MARKER (a regular file, not a link), or
# into one it marked earlier that holds nothing but regular files and runs/ (a directory): no link, no FIFO.
# Anything else is refused with one line, before anything is written. Inside runs/, train guards its own runs.
NEW_OR_EMPTY="choose a new or empty output directory (e.g. gpu-results-2)"
if [ -L "$OUT_DIR" ] && [ ! -d "$OUT_DIR" ]; then
    fail "$OUT_DIR is a symbolic link to nothing (or a loop of links); $NEW_OR_EMPTY."
elif [ -e "$OUT_DIR" ] && [ ! -d "$OUT_DIR" ]; then
    fail "$OUT_DIR exists and is not a directory; $NEW_OR_EMPTY."
fi
mkdir -p -- "$OUT_DIR" 2>/dev/null && OUT_DIR=$(CDPATH= cd -P -- "$OUT_DIR" && pwd) \
    || fail "cannot make or enter the output directory $OUT_DIR; $NEW_OR_EMPTY, one you may write."
first=$(find "$OUT_DIR" -mindepth 1 -maxdepth 1 -print -quit 2>/dev/null) \
    || fail "cannot list the output directory $OUT_DIR; $NEW_OR_EMPTY, one you may read and write."
if [ -f "$OUT_DIR/$MARKER" ] && [ ! -L "$OUT_DIR/$MARKER" ]; then  # one this script made: used again
    odd=$(find "$OUT_DIR" -mindepth 1 -maxdepth 1 ! -type f ! \( -name runs -type d \) -print -quit)
    [ -n "$odd" ] && fail "$OUT_DIR holds $odd, which is a symbolic link or not a regular file, and gpu_check.sh never \
writes through or over one; move it away, or $NEW_OR_EMPTY."
elif [ -n "$first" ]; then
    fail "$OUT_DIR is not empty and gpu_check.sh did not make it (no $MARKER marker), so it writes nothing \
there; $NEW_OR_EMPTY."
fi
[ -f "$OUT_DIR/$MARKER" ] || printf 'made by benchmarks/gpu_check.sh, which may write into this directory again\n' \
    > "$OUT_DIR/$MARKER" || fail "cannot write $OUT_DIR/$MARKER; $NEW_OR_EMPTY, one you may write."
: > "$OUT_DIR/steps.tsv"

log() { echo "== $(date +%T) $*"; }
limit() {  # the step's own limit, cut to what is left of TOTAL (20 s kept: the kill grace and the summary)
    local left=$(( TOTAL - ($(date +%s) - START) - 20 ))
    [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"
}
step() {  # step NAME SECONDS COMMAND...: run under timeout, log to OUT_DIR/NAME.log, record the outcome
    local name=$1 seconds; seconds=$(limit "$2"); shift 2
    log "$name (limit ${seconds}s)"
    local t0; t0=$(date +%s.%N)
    timeout -k 10 "$seconds" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$t0" "$(date +%s.%N)" "$seconds" "$rc" >> "$OUT_DIR/steps.tsv"
    [ "$rc" = 124 ] && log "$name: stopped at its limit" || log "$name: exit $rc"
}

if command -v nvidia-smi > /dev/null && [ "$DRY" = 0 ]; then
    ( while :; do  # time, MiB used on the GPU, % utilisation, then one line per process: pid MiB command
        echo "T $(date +%s.%N) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits \
            | head -1 | tr -d ,)"
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null \
            | while IFS=', ' read -r pid mib; do
                echo "P $pid $mib $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-300)"
              done
        sleep 1
      done ) > "$OUT_DIR/gpu-memory.log" 2>&1 &
    SAMPLER=$!
    trap 'kill "$SAMPLER" 2>/dev/null' EXIT
fi

step preflight 60 python3 -m fmnist_keras.train --device "$GPU" --model cnn --subset 1000 --epochs 1 \
    --out-dir "$OUT_DIR/runs" --run-name preflight --no-report --overwrite
if [ "$(tail -n 1 "$OUT_DIR/steps.tsv" | cut -f5)" != 0 ]; then
    log "preflight failed: the set-up cannot train the CNN on $GPU; its log follows, the other steps are skipped"
    tail -n 30 "$OUT_DIR/preflight.log"
    exit 1
fi

step env 20 bash -c '  # key: value lines, which summary.md turns into a table
    IFS=, read -r name driver memory < <(nvidia-smi --query-gpu=name,driver_version,memory.total \
        --format=csv,noheader 2>/dev/null | head -1)
    echo "GPU: ${name:-none (nvidia-smi not available)}"; echo "driver:${driver:- -}"; echo "GPU memory:${memory:- -}"
    KERAS_BACKEND=torch python3 -c "import torch, keras; print(\"torch:\", torch.__version__); print(\"CUDA (torch build):\", torch.version.cuda); print(\"keras:\", keras.__version__)"
    KERAS_BACKEND=jax python3 -c "import jax; print(\"jax:\", jax.__version__, jax.devices())" 2>/dev/null || echo "jax: not installed"
    echo "CPU: $(lscpu | sed -n "s/^Model name: *//p") ($(nproc) cores)"'

log "devices"
pids=()  # the steps running beside each other; `wait` names them, as the sampler never ends
step devices-torch-$GPU 50 python3 -m fmnist_keras.train --backend torch --device "$GPU" --model mlp --subset 3000 \
    --epochs 1 --out-dir "$OUT_DIR/runs" --run-name torch-$GPU --no-report --overwrite & pids+=($!)
step devices-torch-cpu 50 python3 -m fmnist_keras.train --backend torch --device cpu --model mlp --subset 3000 \
    --epochs 1 --out-dir "$OUT_DIR/runs" --run-name torch-cpu --no-report --overwrite & pids+=($!)
step devices-jax-$GPU 50 python3 -m fmnist_keras.train --backend jax --device "$GPU" --model mlp --subset 3000 \
    --epochs 1 --out-dir "$OUT_DIR/runs" --run-name jax-$GPU --no-report --overwrite & pids+=($!)
step syncs 50 python3 benchmarks/syncs.py --json "$OUT_DIR/syncs.json" & pids+=($!)  # counts, not times: sharing is harmless
# shellcheck disable=SC2086  # the *_ARGS are word lists
step jax 60 env KERAS_BACKEND=jax python3 benchmarks/bench.py $JAX_ARGS --json "$OUT_DIR/bench-jax.json" & pids+=($!)
wait "${pids[@]}"; pids=()

# shellcheck disable=SC2086
step overhead 75 python3 benchmarks/bench.py --overhead $OVERHEAD_ARGS --json "$OUT_DIR/overhead.json"
# shellcheck disable=SC2086
step bench 75 python3 benchmarks/bench.py --models baseline-cnn mlp cnn $BENCH_ARGS --json "$OUT_DIR/bench.json"

# shellcheck disable=SC2086
step train-default "$TOTAL" python3 -m fmnist_keras.train $TRAIN_ARGS --out-dir "$OUT_DIR/runs" --run-name default \
    --overwrite & pids+=($!)
# shellcheck disable=SC2086
step train-cnn-large "$TOTAL" python3 -m fmnist_keras.train --model cnn-large $LARGE_ARGS --out-dir "$OUT_DIR/runs" \
    --run-name cnn-large --overwrite & pids+=($!)
# shellcheck disable=SC2086
step train-cnn-b512 "$TOTAL" python3 -m fmnist_keras.train --model cnn --batch-size 512 --learning-rate 0.006 \
    $B512_ARGS --out-dir "$OUT_DIR/runs" --run-name cnn-b512 --overwrite & pids+=($!)
wait "${pids[@]}"; pids=()

[ -n "${SAMPLER:-}" ] && kill "$SAMPLER" 2>/dev/null
python3 benchmarks/gpu_summary.py "$OUT_DIR" | tee "$OUT_DIR/summary.md"
log "done in $(( $(date +%s) - START ))s; results in $OUT_DIR"
