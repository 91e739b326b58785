#!/usr/bin/env bash
# Set-up (scripts/setup.sh) and the benchmark runner with its CPU defaults; extra
# arguments go to the runner (python -m benchmarks --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m benchmarks "$@"
