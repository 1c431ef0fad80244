#!/usr/bin/env bash
# Sets up .venv if needed and runs the test suite (GPU-only tests are skipped with the reason).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The demo's browser test drives Debian's Chromium; install it where we may (root with apt), else that test
# is skipped with the reason.
if ! command -v chromedriver >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver for the demo's browser test ..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
        >/tmp/distrifusion-apt.log 2>&1 || echo "could not install chromium (see /tmp/distrifusion-apt.log)"
fi
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
