#!/usr/bin/env bash
# Builds .whl/ for the GPU machine: ../shared/device/wheels.sh (deepspeed, wandb and what they need), plus
# what `mtrank`'s CLI and the parallel GPU tests need there and its image lacks: jsonargparse[signatures]
# (Lightning's CLI raises "Requirement 'jsonargparse[signatures]>=4.27.7' not met" without it) and pytest-xdist.
# Use from the project root: bash scripts/gpu_wheels.sh ; then carry .whl (see ../shared/device/README.md).
set -euo pipefail
bash ../shared/device/wheels.sh
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl \
  "jsonargparse>=4.27.7" docstring_parser typeshed_client pytest-xdist execnet
ls .whl | grep -E "jsonargparse|docstring|typeshed|xdist|execnet"
