#!/usr/bin/env bash
# The main job of the README: set up (idempotent; the demo needs only the base package), then run the demo on the
# shipped model.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/controlnext ] || bash scripts/setup.sh ""
. .venv/bin/activate
controlnext demo --output outputs/demo "$@"
