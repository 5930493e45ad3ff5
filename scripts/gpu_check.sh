#!/usr/bin/env bash
# GPU check on the device machine (see ../shared/device/README.md): the test suite, then the quick start
# on one GPU in bf16-mixed, with its metrics copied to $OUT. Needs .whl/ (scripts/gpu_wheels.sh) carried along.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD WANDB_MODE=offline PYTHONUNBUFFERED=1 || exit 1
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi -L
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:warnings -x 2>&1 | tail -5
start=$(date +%s)
python3 -m mtrank fit --config configs/quickstart.yaml --trainer.accelerator gpu --trainer.precision bf16-mixed \
  --trainer.enable_progress_bar false --trainer.default_root_dir runs_gpu 2>&1 | grep -vi warn | tail -25
echo "quickstart on GPU: $(( $(date +%s) - start )) s (data generation included)"
cp runs/quickstart/version_0/metrics.csv "$out/gpu_quickstart_metrics.csv" 2>/dev/null
