#!/usr/bin/env bash
# Runs the GPU-only tests (NCCL ranks; later TensorRT) on a host with NVIDIA GPUs and a CUDA build of
# torch in .venv (install one with: .venv/bin/pip install torch==2.13.0 --index-url <your CUDA wheel index>).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pip install -q -e ".[test,gpu,server]"
exec .venv/bin/python -m pytest -q -rs -m gpu "$@"
