#!/usr/bin/env bash
# Creates .venv (if missing) with torch 2.13.0 (CPU), numpy, ninja, pytest, hypothesis, the
# benchmark extras, transformers (the optional Hugging Face integration, which the tests cover) with
# accelerate and datasets (its Trainer tests),
# then builds and installs fused_loss into it (editable).
# Override the interpreter with PYTHON=..., the venv with VENV=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch pinned: 2.13.0 is the CPU build (an unpinned torch pulls a multi-GB CUDA build).
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q numpy ninja "setuptools>=64" wheel pytest hypothesis tqdm matplotlib transformers accelerate datasets
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import fused_loss, torch; print('fused_loss built for torch', torch.__version__)"
