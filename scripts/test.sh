#!/usr/bin/env bash
# The test command of the README: set up (idempotent), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
