#!/usr/bin/env bash
# One prepared run for a lent GPU machine (PyTorch there; no Ray, no MLflow): the CUDA-marked tests
# (towers on the GPU, the worker's epoch/eval functions with fp32 and AMP+channels_last) and the
# model speeds, fp32 vs AMP+channels_last.   bash bench/gpu_check.sh [OUTDIR]
set -u
out=${1:-.}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.device_count(), 'GPU(s)')"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_model.py tests/unit/test_train_step.py 2>&1 | tail -4 | tee "$out/gpu_tests.txt"
for flags in "--no-amp --no-channels-last" "--amp --channels-last"; do
  python3 bench/model_speed.py --device cuda --batch-size 128 --steps 40 $flags
done 2>&1 | tee "$out/model_speed_cuda.txt"
