#!/usr/bin/env bash
# Creates .venv with every pinned dependency (idempotent: reinstalls only when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
echo "setting up .venv with $($PYTHON --version) ..."
[ -d .venv ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and exact: a looser spec would pull a multi-GB CUDA build on a CPU machine.
.venv/bin/python -m pip install -q torch==2.13.0
# server: nvidia-pytriton, the local tritonserver that the quick start and the serving tests start.
.venv/bin/python -m pip install -q -e ".[test,server]"
rm -f .venv/.installed-*
touch "$stamp"
echo "setup done"
