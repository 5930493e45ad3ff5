#!/usr/bin/env bash
# Long-sequence encoders on the device machine (see ../shared/device/README.md): the GPU tests, the
# recomputation memory benchmark and the same-budget encoder comparison, results in $OUT.
# Needs .whl/ (scripts/gpu_wheels.sh) carried along.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD WANDB_MODE=offline PYTHONUNBUFFERED=1 || exit 1
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi -L
python3 -m pytest -q -p no:warnings tests/test_gpu.py tests/test_ultra_hstu.py 2>&1 | tail -3
python3 scripts/bench_recompute.py --device cuda --batch 32 --max-len 4096 --dim 128 --layers 4 --heads 4 \
  --local-window 256 --global-prefix 16 --dtype bfloat16 --out "$out/recompute_gpu.json" 2>&1 | tail -7
timeout "${COMPARE_TIMEOUT:-420}" python3 scripts/compare_encoders.py --accelerator gpu --precision bf16-mixed \
  --max-len 1024 --users 2000 --history-mean 1300 --samples-per-user 30 --batch-size 256 --epochs 1 \
  --runs /tmp/compare --out "$out/compare_gpu.json" 2>&1 | grep -v -i warn | grep -A8 "^max_len\|^==\|Error\|error"
