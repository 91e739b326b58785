#!/usr/bin/env bash
# The test suite against an AddressSanitizer + UBSan build of fused_loss._C.
# Builds with FUSED_LOSS_SANITIZE=1 (setup.py) into build/sanitize (the normal build and
# fused_loss/_C*.so are left alone), copies the Python package beside it, runs pytest on that
# copy with the sanitizer runtime preloaded, and fails if pytest fails or a sanitizer reports.
# Needs the set-up of scripts/setup.sh. PYTHON=... overrides .venv/bin/python, CXX=... the
# compiler; ASAN_OPTIONS / UBSAN_OPTIONS given are appended (later options win), e.g.
# ASAN_OPTIONS=halt_on_error=0 UBSAN_OPTIONS=halt_on_error=0 to list every finding in one run.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
# The runtime must be the one of the compiler that builds (torch's cpp_extension uses $CXX or c++).
export CXX=${CXX:-c++}
PKG=$ROOT/build/sanitize
LOG=$ROOT/build/sanitize-tests.log
export PATH="$(dirname "$PY"):$PATH"  # ninja from the venv

FUSED_LOSS_SANITIZE=1 "$PY" setup.py -q build_ext --build-temp build/sanitize-tmp --build-lib "$PKG"
# The package's Python files (subpackages included) beside the sanitized _C, no stale ones.
find "$PKG/fused_loss" -name '*.py' -delete
(cd fused_loss && find . -name '*.py' -exec install -D -m 644 {} "$PKG/fused_loss/{}" \;)

ASAN_LIB=$("$CXX" -print-file-name=libasan.so)
UBSAN_LIB=$("$CXX" -print-file-name=libubsan.so)
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
  [ -f "$lib" ] || { echo "sanitize.sh: $CXX has no $lib" >&2; exit 2; }
done
mkdir -p "$(dirname "$LOG")"

# python and torch are not instrumented: the ASan runtime has to be loaded before them.
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB${LD_PRELOAD:+ $LD_PRELOAD}"
# detect_leaks=0: CPython and torch keep allocations until exit by design.
export ASAN_OPTIONS="detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# The sanitized copy first; the root for `benchmarks`. PYTHONSAFEPATH: `python -m` would
# otherwise put the working directory, whose fused_loss/ holds the unsanitized _C, first.
# Unbuffered: the output before a sanitizer abort is not lost.
export PYTHONPATH="$PKG:$ROOT" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
# A fresh inductor cache: the shared one keys graphs on torch, not on our fake kernels, and
# replays graphs compiled for another build of fused_loss (stale output shapes).
export TORCHINDUCTOR_CACHE_DIR=$ROOT/build/sanitize-inductor
rm -rf "$TORCHINDUCTOR_CACHE_DIR"

"$PY" -c "
import fused_loss._C as C, sys
print('sanitize.sh: extension', C.__file__)
sys.exit(not C.__file__.startswith('$PKG/'))"

# --capture=sys: pytest's default fd capture would swallow a report written just before an abort.
# The log is scanned too: with halt_on_error=0, or in a subprocess, a report need not fail pytest.
set +e
"$PY" -m pytest tests -q --capture=sys "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
if grep -qE 'ERROR: AddressSanitizer|: runtime error: ' "$LOG"; then
  echo "sanitize.sh: sanitizer reports (see $LOG), pytest exit $rc" >&2
  exit 1
fi
exit "$rc"
