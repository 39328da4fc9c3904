#!/usr/bin/env bash
# The five-minute GPU check (benchmarks/gpu_check.py; benchmarks/README.md): pure torch, for a lent
# device that has python and torch and nothing else of the project's stack. Runs whichever python
# is on PATH (the device has no .venv); the markdown table goes to stdout and, with OUT set, the
# same figures to $OUT/gpu_check.json.
#   bash benchmarks/gpu_check.sh                        # on the GPU
#   bash benchmarks/gpu_check.sh --device cpu --small   # a smoke run on a CPU, under a minute
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
exec timeout 300 "$PYTHON" benchmarks/gpu_check.py "$@"
