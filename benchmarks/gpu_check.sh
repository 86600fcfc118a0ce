#!/usr/bin/env bash
# GPU check (issue 7), one prepared script for a machine with an NVIDIA GPU; about 5-8 minutes on an H100.
# Prints: backend parity vs the torch reference on CUDA; greedy parity vs transformers on a ~1B random Fuyu;
# decode throughput at batch 1/16/64 vs transformers' generate; batch-1 decode bandwidth vs copy bandwidth.
#   bash benchmarks/gpu_check.sh [--backend auto|flash|triton]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1
echo "== attention backends vs the torch reference, on CUDA"
"$PY" -m pytest -q -p no:cacheprovider tests/test_triton_attention.py tests/test_attention.py
echo "== 1B random Fuyu: greedy parity, throughput, bandwidth"
"$PY" -m benchmarks.gpu_check "$@"
