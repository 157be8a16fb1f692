#!/usr/bin/env bash
# The GPU check: correctness (packed vs unpacked losses, flash-attention vs sdpa) and speed (encoder fwd+bwd MFU at
# FineViT-0.86B next to the Qwen2-VL tower at the matched config, a Stage III training step, batched generation) on
# one CUDA device, in one run of a few minutes; writes results/gpu_check/gpu_check.{json,md}.
#   bash benchmarks/gpu_check.sh                 # on a GPU machine (after `make setup`; flash-attn optional)
#   bash benchmarks/gpu_check.sh --device cpu --tiny   # checks the script itself anywhere, in seconds
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PYTHON" -m finevit_vl.benchmarking.gpu_check "$@"
