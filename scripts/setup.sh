#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the CPU torch first (an unpinned torch
# would pull several GB of CUDA wheels), then advpure and its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  python -m pip install -q "torch==$TORCH_VERSION"
fi
python -m pip install -q -e ".[test]"
python -c "import torch, ray, pyarrow; print(f'advpure set up: torch {torch.__version__}, ray {ray.__version__}, pyarrow {pyarrow.__version__}')"
