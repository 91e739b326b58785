#!/usr/bin/env bash
# Compile-and-link check of the CUDA build on a machine without a GPU (CI runs it).
# A venv outside the repository (FUSED_LOSS_CUDA_VENV, default ~/.cache/fused_loss/cuda-venv) holds
# the CUDA build of torch 2.14.1 (5.5 GB, installed once, reused by later runs); the extension is
# built with FUSED_LOSS_CUDA=1 into build/cuda-check (the repository's CPU build is untouched), then
# loaded by that torch, and the dispatcher must list our CUDA kernels. Kernels cannot run here.
# CUDA_HOME: the toolkit (default /usr/local/cuda). TORCH_CUDA_ARCH_LIST: default 9.0 here (one arch
# checks the code as well as three, in a third of CI's time; setup.py's default builds 8.0;9.0+PTX).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FUSED_LOSS_CUDA_VENV:-$HOME/.cache/fused_loss/cuda-venv}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_check.sh: no nvcc in CUDA_HOME=$CUDA_HOME; skipped" >&2
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" ninja numpy "setuptools>=64" wheel
fi
PY=$VENV/bin/python
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# torch's CUDA headers include cuBLAS/cuSPARSE headers that only torch's nvidia wheels carry.
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$SITE/nvidia/cu13/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export PATH="$VENV/bin:$CUDA_HOME/bin:$PATH"
OUT=build/cuda-check
start=$(date +%s)
mkdir -p "$OUT"
# The compilers' output goes to a log (torch 2.14's headers draw thousands of warnings from GCC);
# its end is shown if the build fails.
# The schemas and the CUDA sources only (FUSED_LOSS_CUDA_ONLY): the CPU sources are CI's main build.
if ! FUSED_LOSS_CUDA=1 FUSED_LOSS_CUDA_ONLY=1 "$PY" setup.py -q build_ext --build-temp "$OUT/tmp" --build-lib "$OUT/lib" \
    > "$OUT/build.log" 2>&1; then
  grep -E "error|FAILED" "$OUT/build.log" | head -40 >&2
  tail -n 40 "$OUT/build.log" >&2
  echo "cuda_check.sh: the CUDA build failed (log: $OUT/build.log)" >&2
  exit 1
fi
# Our own sources must compile without a warning (torch's and GCC's headers are not ours).
if grep -E "^(csrc|$PWD/csrc)/[^ ]*(\(|:)[0-9]+.*warning" "$OUT/build.log" >&2; then
  echo "cuda_check.sh: warnings in fused_loss's sources (above)" >&2
  exit 1
fi
# The package's Python files (subpackages included) beside the built _C, no stale ones.
find "$OUT/lib/fused_loss" -name '*.py' -delete
(cd fused_loss && find . -name '*.py' -exec install -D -m 644 {} "$OLDPWD/$OUT/lib/fused_loss/{}" \;)
check() {
PYTHONPATH="$OUT/lib" PYTHONSAFEPATH=1 "$PY" - <<'PY'
import torch
import fused_loss
from fused_loss import _C

# Every op of csrc/fused_loss.cpp has a CUDA kernel (linear cross-entropy's ops are Python, over
# these; the CPU output cache's controls are not built here).
python_ops = {"linear_cross_entropy_forward", "linear_cross_entropy_backward"}
expected = sorted(op.split("::")[1] for op in torch._C._dispatch_get_all_op_names()
                  if op.startswith("fused_loss::") and op.split("::")[1] not in python_ops)
assert len(expected) >= 19, expected
missing = [op for op in expected if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_loss::{op}", "CUDA")]
assert _C.__file__.startswith("build/cuda-check") or "cuda-check" in _C.__file__, _C.__file__
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"cuda_check.sh: {_C.__file__} loads with torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"CUDA kernels of {len(expected)} ops registered")
# Unverified CUDA kernels are used only when asked for (fused_loss/ops.py): check the gate both ways.
import os
from fused_loss import ops
used = {op for op, device in ops.KERNELS if device == "cuda"}
if os.environ.get("FUSED_LOSS_CUDA_UNVERIFIED") == "1":
    assert used == {f"fused_loss::{op}" for op in expected}, used
else:
    assert not used, used
    try:
        ops.require_kernel("fused_loss::smooth_l1_loss_forward", torch.device("cuda"), "smooth_l1_loss")
        raise AssertionError("no error for an unverified CUDA kernel")
    except NotImplementedError as e:
        assert "not yet verified" in str(e), e
PY
}
check
FUSED_LOSS_CUDA_UNVERIFIED=1 check > /dev/null
echo "cuda_check.sh: built and checked in $(( $(date +%s) - start )) s"
