#!/usr/bin/env bash
# Device check for a GPU host (no network needed): the transformers backend on CUDA with the bundled
# SmolLM2 GGUF behind `localroute serve`, a small concurrent load, NVML readings (utilisation,
# memory, power, energy), one JSON summary on stdout. Details and exit codes: scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh [--requests 64] [--concurrency 16] [--max-tokens 64]
#
# Python: $PYTHON, else .venv/bin/python, else python3; it needs localroute with the hf extra
# (torch with CUDA, transformers, gguf, accelerate) and nvidia-ml-py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/gpu_check.py "$@"
