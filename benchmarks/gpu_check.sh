#!/usr/bin/env bash
# The GPU checks, as one script (README, "GPU"): run from the repository root
# on a machine with a CUDA GPU and a torch (and optionally jax) CUDA build.
#
#   OUT=gpu-results bash benchmarks/gpu_check.sh
#
# 1. device selection on every installed backend (--device gpu / cpu);
# 2. the speed benchmark (Keras path vs plain PyTorch) on the GPU, alone;
# 3. accuracy runs, in parallel on the one GPU: the CNN with 3 seeds and
#    cnn-large (their wall times are inflated by sharing the GPU);
# working in $WORK and copying the few result files to $OUT at the end.
set -u
OUT=${OUT:-gpu-results}
WORK=${WORK:-/tmp/fmnist-gpu}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/*.py import the package from the checkout
log() { echo "== $(date +%T) $*"; }
LIMIT=${LIMIT:-330}  # seconds for the accuracy runs

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/nvidia-smi.txt"
KERAS_BACKEND=torch python3 -c "import torch, keras; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'keras', keras.__version__)"

log "device selection"
python3 -m fmnist_keras.train --backend torch --device gpu --model mlp --subset 6000 --epochs 2 \
    --out-dir "$WORK/runs" --run-name torch-gpu --no-report 2>&1 | grep -E "^(Backend|Data|Saved|error)" 
python3 -m fmnist_keras.train --backend torch --device cpu --model mlp --subset 6000 --epochs 1 \
    --out-dir "$WORK/runs" --run-name torch-cpu --no-report 2>&1 | grep -E "^(Backend|Saved|error)"
python3 -m fmnist_keras.train --backend jax --device gpu --model mlp --subset 6000 --epochs 2 \
    --out-dir "$WORK/runs" --run-name jax-gpu --no-report 2>&1 | grep -E "^(Backend|Saved|error)"
grep -h '"device"' "$WORK"/runs/*/mlp/metrics.json

log "benchmark (alone on the GPU)"
python3 benchmarks/bench.py --models baseline-cnn mlp cnn --epochs 3 --json "$OUT/bench-gpu.json" 2>&1 \
    | grep -v -E "^(I0000|WARNING)" | tail -12

log "accuracy runs, in parallel (limit ${LIMIT}s)"
export OMP_NUM_THREADS=3
timeout "$LIMIT" python3 benchmarks/seeds.py --model cnn --seeds 42 1 2 --jobs 3 --out-dir "$WORK/seeds" \
    --json "$OUT/seeds-cnn.json" > "$OUT/seeds-cnn.txt" 2>&1 &
timeout "$LIMIT" python3 -m fmnist_keras.train --model cnn-large --out-dir "$WORK/runs" --run-name cnn-large \
    > "$WORK/cnn-large.log" 2>&1 &
wait
tail -8 "$OUT/seeds-cnn.txt"
tail -4 "$WORK/cnn-large.log" | tr '\r' '\n' | tail -4
cp "$WORK"/runs/cnn-large/cnn-large/metrics.json "$OUT/cnn-large-metrics.json" 2>/dev/null
cp "$WORK"/runs/cnn-large/cnn-large/history.csv "$OUT/cnn-large-history.csv" 2>/dev/null
cp "$WORK"/runs/torch-gpu/mlp/metrics.json "$OUT/torch-gpu-mlp-metrics.json" 2>/dev/null
cp "$WORK/nvidia-smi.txt" "$OUT/" 2>/dev/null
log "done"
