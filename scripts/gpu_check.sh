#!/usr/bin/env bash
# What a GPU machine must show (issues 2, 7 and 14), in one command: the CUDA tests (tests/test_cuda.py,
# skipped on machines without a GPU), then the throughput benchmark (python -m
# ssl_colorize.benchmarks.throughput) on the GPU with any extra options given here. Logs and the
# benchmark's CSV rows go to $OUT (default results/gpu); append the rows to results/throughput.csv
# once they are checked.
#   bash scripts/gpu_check.sh                          # tests + every section at the paper's sizes
#   bash scripts/gpu_check.sh --sections loss --steps 5  # tests + a shorter benchmark
#   bash scripts/gpu_check.sh --sections pretrain --encoders alexnet_lab --target-images-per-s 5000  # issue 7
# Uses the python3 on PATH with this checkout on PYTHONPATH (no install), so it also runs on a machine
# whose image already holds torch, torchvision, timm and scikit-learn.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/device.txt"
"$PY" -m pytest -p no:cacheprovider -q -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log"
tests=${PIPESTATUS[0]}
"$PY" -m ssl_colorize.benchmarks.throughput --device cuda --no-progress --out-csv "$OUT/throughput.csv" "$@" 2>&1 | tee "$OUT/throughput.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, benchmark exit $bench"
exit $(( tests || bench ))
