#!/usr/bin/env bash
# Create .venv with the CPU build of torch (never a CUDA download) and install controlnext with the extras given as
# the first argument (default: all of them, dev included, for the tests; "" installs the base package only).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1-train,video,web,bench,eval,dev}"
echo "setup: installing the CPU build of torch and controlnext${extras:+[$extras]} into .venv (takes a few minutes)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Install the CPU torch first, so that no later requirement pulls a CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".${extras:+[$extras]}"
# Headless Chromium for the browser test of the web app (Debian's package; Playwright never downloads a browser).
if [[ ",$extras," == *,dev,* ]] && [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null 2>&1 \
  && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
