#!/usr/bin/env bash
# GPU readiness in one call: every cryopick network trained and run on one CUDA device (<= 8 minutes).
#
#   bash bench/gpu_check.sh                  # the full check on a CUDA GPU
#   bash bench/gpu_check.sh --cpu-smoke      # the same stages at tiny sizes on the CPU (no GPU needed)
#   bash bench/gpu_check.sh --help           # options (--device, --precision, --stages, --out, --threads)
#
# Exit status 0: every stage ran on the expected device; 1: a stage failed (lines starting 'FAIL');
# 2: bad options, or no CUDA device without --cpu-smoke. What each stage does, what is checked and the
# state of the CUDA path (written without a GPU at hand, not yet run on one): bench/gpu_check.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${CRYOPICK_PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python="$(command -v python3)"; fi
fi
exec "$python" "$here/gpu_check.py" "$@"
