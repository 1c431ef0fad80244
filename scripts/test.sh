#!/usr/bin/env bash
# Sets up .venv if needed and runs the test suite (GPU-only tests are skipped with the reason).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q -rs "$@"
