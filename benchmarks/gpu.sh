#!/usr/bin/env bash
# GPU throughput, MFU and peak memory vs the plan's estimate: llama ~125M and ~350M at seq_len
# 1024 and 2048, bf16 + torch.compile. Under 5 minutes on one H100/H200.
#   bash benchmarks/gpu.sh          # on a CUDA machine
#   bash benchmarks/gpu.sh --dry    # anywhere (CPU, tiny shapes): keeps the script working in CI
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" benchmarks/gpu.py "$@"
