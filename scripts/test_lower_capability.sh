#!/usr/bin/env bash
# The comparison tests once more at the CPU dispatch level below this machine's best: torch's own
# kernels (ATEN_CPU_CAPABILITY) and fused_loss's (FUSED_LOSS_CPU_CAPABILITY) both at AVX2 on an
# AVX-512 machine, both at DEFAULT (no vector extension) on an AVX2 one. torch's float32 rounding
# depends on which of its kernels runs, so a test that trusts it fails here on every machine, not
# only on some (tests/helpers.py: the float64 rule). LEVEL=AVX2|DEFAULT chooses the level.
# Builds into build/<level> (the normal build and fused_loss/_C*.so are left alone), copies the
# Python package beside it and runs pytest on that copy. Needs the set-up of scripts/setup.sh.
# Extra arguments go to pytest (default: the files that compare with torch).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
export PATH="$(dirname "$PY"):$PATH"  # ninja from the venv

BEST=$("$PY" -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
case "${LEVEL:-}" in
  "") case "$BEST" in AVX512) LEVEL=AVX2 ;; *) LEVEL=DEFAULT ;; esac ;;
  AVX2|DEFAULT) ;;
  *) echo "test_lower_capability.sh: LEVEL must be AVX2 or DEFAULT, got $LEVEL" >&2; exit 2 ;;
esac
PKG=$ROOT/build/capability-$LEVEL
mkdir -p "$ROOT/build"
echo "test_lower_capability.sh: this machine's best level is $BEST; testing at $LEVEL"

FUSED_LOSS_CPU_CAPABILITY=$LEVEL FUSED_LOSS_CUDA=0 "$PY" setup.py -q build_ext \
  --build-temp "$PKG-tmp" --build-lib "$PKG" > "$PKG.build.log" 2>&1 || { tail -n 40 "$PKG.build.log" >&2; exit 1; }
find "$PKG/fused_loss" -name '*.py' -delete
(cd fused_loss && find . -name '*.py' -exec install -D -m 644 {} "$PKG/fused_loss/{}" \;)

# The built copy first; the root for `benchmarks`. PYTHONSAFEPATH: `python -m` would otherwise put
# the working directory, whose fused_loss/ holds the normal build, first. A fresh inductor cache:
# the shared one replays graphs compiled for another build of fused_loss.
export PYTHONPATH="$PKG:$ROOT" PYTHONSAFEPATH=1 ATEN_CPU_CAPABILITY=${LEVEL,,}
export TORCHINDUCTOR_CACHE_DIR=$PKG-inductor
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
"$PY" - "$PKG" "$LEVEL" <<'PY'
import sys
import torch
import fused_loss._C as C
pkg, level = sys.argv[1:]
print(f"test_lower_capability.sh: torch runs its {torch.backends.cpu.get_cpu_capability()} kernels, "
      f"fused_loss its {C.CPU_CAPABILITY} ones ({C.__file__})")
assert C.__file__.startswith(pkg + "/"), C.__file__
assert torch.backends.cpu.get_cpu_capability() == level == C.CPU_CAPABILITY
PY
if [ $# -eq 0 ]; then
  set -- tests/test_cross_entropy.py tests/test_cross_entropy_options.py tests/test_edge_cases.py \
    tests/test_elementwise_losses.py tests/test_in_pass_gradient.py tests/test_in_pass_gradient_elementwise.py \
    tests/test_linear_cross_entropy.py tests/test_fuzz.py tests/test_precision.py tests/test_autocast.py \
    tests/test_patch.py tests/test_higher_order.py
fi
exec "$PY" -m pytest -q "$@"
