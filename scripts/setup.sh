#!/usr/bin/env bash
# Sets up mtrank in ./.venv: torch (kept if the venv already has one), then mtrank and its dependencies.
#   bash scripts/setup.sh          # the framework
#   bash scripts/setup.sh --dev    # plus pytest and ruff
# Torch: set MTRANK_TORCH to choose the build (e.g. MTRANK_TORCH="torch==2.11.0" or a wheel path);
# by default a machine with an NVIDIA GPU gets PyPI's CUDA torch, one without gets torch 2.13.0
# (a local CPU wheel where the machine has one, as on the project's CI machines).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${MTRANK_TORCH:-}" ]; then
    torch_spec=$MTRANK_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    torch_spec="torch>=2.4,<2.15"
  else
    torch_spec="torch==2.13.0"
  fi
  echo "setup: installing $torch_spec"
  "${pip[@]}" "$torch_spec"
fi

# DeepSpeed ships as a source archive: build it without compiling its ops (they JIT-compile on a GPU).
echo "setup: installing mtrank$extra"
DS_BUILD_OPS=0 "${pip[@]}" -e ".$extra"
.venv/bin/python -c "import torch, lightning, mtrank; print(f'setup: torch {torch.__version__}, lightning {lightning.__version__}, mtrank ready')"
