#!/usr/bin/env bash
# GPU validation kit: one command that measures the real-size claims on one CUDA GPU (random weights, no downloads).
#
#   bash benchmarks/gpu/run.sh --out "$OUT/gpu"          # the GPU run: under 8 minutes on an H100/H200
#   bash benchmarks/gpu/run.sh --smoke --out /tmp/kit    # every part at tiny sizes on the CPU (what CI runs)
#
# Options are those of benchmarks/gpu/kit.py (--parts, --budget PART=S, --compile-backend, ...; see --help).
#
# Assumptions (nothing is installed or downloaded by this script):
# - A Python with torch, diffusers, transformers, accelerate, safetensors, numpy, pillow and tqdm is present (the
#   project's runtime dependencies; opencv, peft and the optional extras are not needed). It is, in this order:
#   $PYTHON if set; the repository's .venv; the active virtualenv; python3 on PATH. The first one that imports
#   torch and diffusers is used. For the GPU run its torch must see a CUDA GPU (a CPU-only torch is refused, never
#   replaced: no pip install happens here, so a CUDA build already on the machine stays as it is).
# - The project itself need not be installed: this checkout's src/ is put first on PYTHONPATH (the effect of
#   `pip install -e . --no-deps`, without writing an egg-info into the repository, and without measuring another
#   installed copy by mistake).
# - Nothing is written outside the output folder (default benchmarks/results/gpu-DATE/) except torch.compile's
#   cache in the system temp folder; bytecode caching is off, so no __pycache__ appears in the repository.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"  # no cd: a relative --out is the caller's
export PYTHONDONTWRITEBYTECODE=1
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1  # random weights only: never reach for the hub

smoke=0
for arg in "$@"; do
    [[ "$arg" == "--smoke" ]] && smoke=1
done

candidates=()
[[ -n "${PYTHON:-}" ]] && candidates+=("$PYTHON")
[[ -x "$repo/.venv/bin/python" ]] && candidates+=("$repo/.venv/bin/python")
[[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]] && candidates+=("$VIRTUAL_ENV/bin/python")
candidates+=(python3 python)

py=""
for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch, diffusers" >/dev/null 2>&1; then
        py="$c"
        break
    fi
done
if [[ -z "$py" ]]; then
    echo "run.sh: no Python here imports both torch and diffusers (tried: ${candidates[*]})." >&2
    echo "run.sh: set PYTHON=/path/to/python, or install torch (a CUDA build for the GPU run) and the project's" >&2
    echo "run.sh: dependencies (pip install -e . installs them; nothing is installed by this script)." >&2
    exit 2
fi

# This checkout's src/ first, so that the code measured is this checkout's even when another copy is installed.
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
# One check for the rest (each Python start costs seconds of the GPU slot): packages, the project, CUDA.
"$py" - "$smoke" <<'PY'
import importlib.util
import sys

need = ("transformers", "accelerate", "safetensors", "numpy", "PIL", "tqdm")
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"run.sh: {sys.executable} lacks {', '.join(missing)} (needed by the kit; this script installs nothing).")
try:
    import controlnext  # noqa: F401
except Exception as err:
    sys.exit(f"run.sh: controlnext cannot be imported from src/ with {sys.executable}: {err!r}")
import torch

if sys.argv[1] == "0" and not torch.cuda.is_available():
    sys.exit(
        f"run.sh: {sys.executable} has torch {torch.__version__} but it sees no CUDA GPU; the GPU run needs a CUDA "
        "build of torch on a machine with a GPU (--smoke runs on the CPU)."
    )
print(f"run.sh: {sys.executable}: torch {torch.__version__}, CUDA {torch.version.cuda}", file=sys.stderr)
PY

exec "$py" "$repo/benchmarks/gpu/kit.py" "$@"
