#!/usr/bin/env bash
# GPU check (issue 7), one prepared script for a machine with an NVIDIA GPU; about 5-8 minutes on an H100.
# Prints: backend parity vs the torch reference on CUDA; greedy parity vs transformers on a ~1B random Fuyu;
# decode throughput at batch 1/16/64 vs transformers' generate; batch-1 decode bandwidth vs copy bandwidth.
# Both parts run even if the first fails; the exit status is non-zero if either did. No network needed.
#   bash benchmarks/gpu_check.sh [--backend auto|flash|triton]
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}  # no project venv (a bare GPU machine): the python that holds torch
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: $PY sees no CUDA device (set PYTHON to the interpreter with CUDA torch)" >&2
    exit 2
fi
echo "== attention backends vs the torch reference, on CUDA"
"$PY" -m pytest -q -p no:cacheprovider tests/test_triton_attention.py tests/test_attention.py
tests=$?
echo "== 1B random Fuyu: greedy parity, CUDA graphs vs eager, throughput, bandwidth"
"$PY" -m benchmarks.gpu_check "$@"
check=$?
echo "== gpu_check.sh: tests exit $tests, benchmark exit $check"
[[ $tests -eq 0 && $check -eq 0 ]]
