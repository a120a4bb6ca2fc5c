#!/usr/bin/env bash
# Create .venv with the CPU build of torch (never a CUDA download) and install controlnext with all extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Install the CPU torch first, so that no later requirement pulls a CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[train,video,web,bench,eval,dev]"
# Headless Chromium for the browser test of the web app (Debian's package; Playwright never downloads a browser).
if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
