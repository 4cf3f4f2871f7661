#!/usr/bin/env bash
# The real pipelines/train.py under Ray on a GPU node, CPU vs GPU JPEG decoding, against the model-only
# ceiling on the same GPU (issue 17). One prepared run for a lent machine that has PyTorch but no Ray
# or MLflow: their wheels travel in .whl/ (README, "Benchmarks").
#
#   bash bench/gpu_train.sh OUTDIR                 # on the GPU machine
#   GPUS=0 CLASSES=8 PER_CLASS=20 EPOCHS=2 WIDTH=0.25 CROP=64 bash bench/gpu_train.sh /tmp/o   # dry run on a CPU
#
# Steps, each logged to OUTDIR: the gpu-marked tests; the ceiling (bench/model_speed.py); a generated
# ImageNet-like set (CLASSES x PER_CLASS training images, 256 px); train.py with --decode cpu and gpu;
# --input-only with each.
set -u
out=${1:-.}
GPUS=${GPUS:-1} CLASSES=${CLASSES:-1000} PER_CLASS=${PER_CLASS:-20} EPOCHS=${EPOCHS:-4}
WIDTH=${WIDTH:-1.0} CROP=${CROP:-224} BATCH=${BATCH:-128} CPUS=${CPUS:-$(nproc)}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}
work=$(mktemp -d)
trap 'ray stop --force >/dev/null 2>&1; rm -rf "$work"' EXIT
log() { echo "== $(date +%T) $*" | tee -a "$out/summary.txt"; }

if [ "$GPUS" -gt 0 ] && [ -z "${SKIP_CEILING:-}" ]; then
  log "gpu tests"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_augment.py tests/unit/test_train_step.py \
    tests/unit/test_model.py -k "not True-True-True" 2>&1 | tail -5 | tee -a "$out/summary.txt"
  log "ceiling: bench/model_speed.py"
  python3 bench/model_speed.py --device cuda --batch-size "$BATCH" --steps 40 --amp --channels-last --compile \
    2>&1 | tee "$out/model_speed.txt" | tail -8 | tee -a "$out/summary.txt"
fi

python3 -c "import mlflow.pytorch, ray.train.torch, ray.tune; from mlflow import MlflowClient
MlflowClient('sqlite:///$work/probe.db').search_experiments()" || { log "imports failed"; exit 1; }
log "sample: $CLASSES classes x $PER_CLASS"
python3 -m alexnet.sample --output "$work/in" --num-classes "$CLASSES" --train-per-class "$PER_CLASS" \
  --val-per-class 1 --no-quirks --min-side 256 --max-side 320 --workers "$CPUS" 2>&1 | tail -2
ray start --head --num-cpus "$CPUS" --num-gpus "$GPUS" --disable-usage-stats >"$out/ray_start.txt" 2>&1 \
  || { log "ray start failed"; tail -20 "$out/ray_start.txt"; exit 1; }
uri="sqlite:///$work/mlflow.db"
log "preprocess"
set -o pipefail
python3 pipelines/preprocess.py --input "$work/in" --output "$work/prep" --size 256 --address auto \
  --tracking-uri "$uri" 2>&1 | tail -4 | tee -a "$out/summary.txt" || { log "preprocessing failed"; exit 1; }
set +o pipefail
if [ "$GPUS" -gt 0 ]; then
  log "decode check"
  python3 bench/gpu_decode_check.py "$work/prep" 2>&1 | tail -6 | tee -a "$out/summary.txt"
fi

common=(--data "$work/prep" --address auto --gpus-per-worker "$GPUS" --cpus-per-worker 1 --width "$WIDTH"
        --image-size "$CROP" --batch-size "$BATCH" --init pytorch --eval-10crop-every 0 --lr 0.01
        --storage-path "$work/ray_results" --tracking-uri "$uri" --resource-wait-s 120)
[ "$GPUS" -gt 0 ] && common+=(--compile --amp --channels-last)
modes=(cpu); [ "$GPUS" -gt 0 ] && modes=(cpu gpu)
for mode in "${modes[@]}"; do
  log "train.py --decode $mode"
  python3 pipelines/train.py "${common[@]}" --decode "$mode" --epochs "$EPOCHS" --run-name "train-$mode" \
    >"$out/train_$mode.txt" 2>&1
  echo "rc $?" | tee -a "$out/summary.txt"
  grep -E "epoch [0-9]+/|best val|error" "$out/train_$mode.txt" | tail -"$((EPOCHS + 2))" | tee -a "$out/summary.txt"
  log "train.py --input-only --decode $mode"
  python3 pipelines/train.py "${common[@]}" --decode "$mode" --epochs 3 --input-only --run-name "input-$mode" \
    >"$out/input_$mode.txt" 2>&1
  echo "rc $?" | tee -a "$out/summary.txt"
  grep -E "epoch [0-9]+/|input only|error" "$out/input_$mode.txt" | tail -5 | tee -a "$out/summary.txt"
done
log "done"
