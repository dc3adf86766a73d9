#!/usr/bin/env bash
# `make gpu-check` (see scripts/gpu_check.py): the one-shot GPU validation, with the Python that
# holds the machine's own CUDA build of torch (GPU_PYTHON, default python3; never replaced).
#   DRY_RUN=1   print the plan and check imports, files and options; no GPU needed (CI)
#   WHEELS=1    download the pinned peer wheels into .gpu-wheels/ (needs a package index)
# Results go to $OUT when set, else bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-python3}
args=()
if [ "${DRY_RUN:-0}" = "1" ]; then args+=(--dry-run); fi
if [ "${WHEELS:-0}" = "1" ]; then args+=(--wheels); fi
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "${args[@]}"
