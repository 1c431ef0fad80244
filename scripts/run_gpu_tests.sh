#!/usr/bin/env bash
# Runs the GPU-only tests (NCCL ranks, TensorRT engines, the served fp16 path) on a host with NVIDIA GPUs.
# REQUIRE_GPU=1: a GPU test that skips is a failure, and a host that cannot run them (no GPUs, a CPU build
# of torch, no TensorRT or NCCL) stops here with `distrifusion doctor`'s reason and a non-zero exit.
# A CUDA 13 torch in .venv: .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130
set -euo pipefail
cd "$(dirname "$0")/.."
export REQUIRE_GPU=1
scripts/setup.sh
# the basics first (driver, GPUs, torch CUDA, NCCL), so a CPU host installs nothing more
if ! .venv/bin/python -m python_backend.cli doctor --ranks "${GPU_TEST_RANKS:-2}" --no-engines; then
    echo "run_gpu_tests: this host cannot run the GPU tests (see above)" >&2
    exit 1
fi
.venv/bin/python -m pip install -q -e ".[test,gpu,server]"
if ! .venv/bin/python -m python_backend.cli doctor --ranks "${GPU_TEST_RANKS:-2}"; then
    echo "run_gpu_tests: TensorRT does not match (see above)" >&2
    exit 1
fi
# every test marked gpu: NCCL ranks, TensorRT engines (also replayed as CUDA graphs, --cuda-graphs), the served fp16 path
exec .venv/bin/python -m pytest -q -rs -m gpu "$@"
