#!/usr/bin/env bash
# The prepared GPU check (issue 21): one table in at most 8 minutes on a lent GPU.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--dry-run]
#
# Runs benchmarks/gpu_check.py with $PYTHON (default: python3, or .venv/bin/python when the
# repository has one); see its docstring for the parts. Exit status 3: no CUDA device here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "gpu_check: no Python interpreter '$PYTHON' (set PYTHON=/path/to/python)" >&2
  exit 3
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
