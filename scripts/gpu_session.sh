#!/usr/bin/env bash
# What a session that is lent a GPU runs there, in two device calls (see the device tool's README):
#   here:   bash scripts/gpu_session.sh --fetch-wheels       # peers' wheels into .whl (PyPI; git ignores it)
#   device: run(command="bash scripts/gpu_session.sh test", carry=[".whl"]), then the same with "bench"
#           (each stays inside one call's 10 minutes; the second finds the build done)
# On the GPU machine (torch with CUDA, nvcc, ninja; no network): builds fused_loss with its CUDA kernels
# for this GPU only, installs Liger-Kernel and Cut Cross-Entropy from the carried wheels (no deps: their
# torch and triton are the machine's), runs the CUDA tests and then the whole suite, then the issue's
# benchmarks (fused_loss, eager, torch.compile, Liger, CCE). Everything it writes goes to $OUT
# (default build/gpu-session): logs, the CSV, the markdown report and plots, to commit under
# benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
  python3 -m pip download --no-deps -q -d .whl liger-kernel cut-cross-entropy  # pure Python: any platform
  ls -la .whl
  exit 0
fi
STAGE=${1:-all}  # test | bench | all
OUT=${OUT:-build/gpu-session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
echo "gpu_session.sh: building for sm_$ARCH" | tee "$OUT/summary.txt"
start=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST=$ARCH FUSED_LOSS_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"
  echo "gpu_session.sh: the build failed" | tee -a "$OUT/summary.txt"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
if ls .whl/*.whl > /dev/null 2>&1; then  # as the device tool's README says: a target beside the machine's packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$OUT/build.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
export FUSED_LOSS_CUDA_UNVERIFIED=1  # the point of this run: verify them (see fused_loss/ops.py)
# A per-test time limit where pytest-timeout is installed (an unknown option would fail the run).
TIMEOUT=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120" || true)
if [ "$STAGE" != bench ]; then
  "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider > "$OUT/test_cuda.log" 2>&1
  echo "test_cuda: $(tail -n 1 "$OUT/test_cuda.log")" | tee -a "$OUT/summary.txt"
  "$PY" -m pytest tests -q -p no:cacheprovider $TIMEOUT > "$OUT/tests.log" 2>&1
  echo "tests: $(tail -n 1 "$OUT/tests.log")" | tee -a "$OUT/summary.txt"
  # The comparison tests again, every tensor on the GPU (tests/helpers.py: DEVICE).
  FUSED_LOSS_TEST_DEVICE=cuda "$PY" -m pytest tests/test_cross_entropy.py tests/test_cross_entropy_options.py \
    tests/test_edge_cases.py tests/test_elementwise_losses.py -q -p no:cacheprovider \
    $TIMEOUT > "$OUT/tests_on_cuda.log" 2>&1
  echo "tests on cuda: $(tail -n 1 "$OUT/tests_on_cuda.log")" | tee -a "$OUT/summary.txt"
fi
[ "$STAGE" = test ] && { cat "$OUT/summary.txt"; exit 0; }
# The issue's targets: cross-entropy bf16 8192 x 128256; BCE and smooth L1 on 2^28 elements;
# linear cross-entropy (8192, 4096, 128256) bf16. Providers default to fused_loss, torch,
# torch_compile (+ liger, cce on CUDA).
bench() { "$PY" -m benchmarks --device cuda --out "$OUT" "$@" >> "$OUT/bench.log" 2>&1 ||
          echo "benchmark failed: $*" | tee -a "$OUT/summary.txt"; }
bench --loss cross_entropy --sizes 8192x128256 --dtype bfloat16 --mode full
bench --loss binary_cross_entropy_with_logits smooth_l1_loss --sizes 268435456 --dtype float32 --mode full
bench --loss linear_cross_entropy --sizes 8192x4096x128256 --dtype bfloat16 --mode full
tail -n 40 "$OUT/bench.log"
cat "$OUT/summary.txt"
