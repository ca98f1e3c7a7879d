#!/usr/bin/env bash
# Set up cryopick on this machine and run one job:
#   bash setup.sh demo    set up, then run the demo pipeline (the main job)
#   bash setup.sh test    set up, then run the test suite
#   bash setup.sh         set up only
# Needs Python 3.11 with pip. Run as root, it installs the system packages it needs with apt-get;
# otherwise it names them. The environment lives in .venv/ beside this script.
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
JOB=${1:-setup}
shift || true

log() { echo "[setup] $*" >&2; }

have_tk() { "$1" -c 'import tkinter, venv, ensurepip' >/dev/null 2>&1; }

# --- a Python 3.11 with tkinter (Scipion imports it even headless) -----------------------------
PY=""
for cand in "${PYTHON:-}" python3.11 python3 /usr/bin/python3.11; do
  [ -n "$cand" ] || continue
  command -v "$cand" >/dev/null 2>&1 || continue
  if [ "$("$cand" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "3.11" ] && have_tk "$cand"; then
    PY=$(command -v "$cand"); break
  fi
done
REQUIRED=()
OPTIONAL=()
if [ -z "$PY" ]; then REQUIRED+=(python3.11 python3.11-venv python3-tk); fi
# RELION 3.1 (downstream tests: subtomogram averaging and 2D extraction of our picks), a virtual display and
# ImageMagick (the GUI test opens the real Scipion window and takes screenshots).
command -v relion_reconstruct >/dev/null 2>&1 || OPTIONAL+=(relion)
command -v Xvfb >/dev/null 2>&1 || OPTIONAL+=(xvfb)
{ command -v import >/dev/null 2>&1 && import -version 2>/dev/null | grep -q ImageMagick; } || OPTIONAL+=(imagemagick)
# SLURM and munge: the cluster tests start a private single-node SLURM of their own
# (cryopick_plugin/tests/cluster/start_slurm.sh; its job completion records make `sacct --completion`
# report the jobs, no accounting database needed). No system-wide SLURM service is configured or used.
SLURM_PKGS=()
command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1 \
  || SLURM_PKGS+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || SLURM_PKGS+=(munge)
OPTIONAL+=("${SLURM_PKGS[@]}")
WANT_PKGS=("${REQUIRED[@]}" "${OPTIONAL[@]}")
if [ ${#WANT_PKGS[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing system packages: ${WANT_PKGS[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${WANT_PKGS[@]}" >/dev/null
  elif [ ${#REQUIRED[@]} -gt 0 ]; then
    echo "cryopick setup: please install the system packages: ${REQUIRED[*]}" >&2; exit 1
  else
    log "optional system packages missing (their tests will be skipped): ${OPTIONAL[*]}"
  fi
  [ -n "$PY" ] || PY=/usr/bin/python3.11
fi

# --- the virtual environment -------------------------------------------------------------------
VENV="$HERE/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.cryopick-installed"
WANT=$(cat requirements.txt requirements-test.txt setup.py | sha1sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  log "installing the Python stack (first time: several minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-test.txt
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"

# The shared data (real maps and micrographs; see README): $CRYOPICK_DATA, else ../shared/data beside this
# checkout — and for a throw-away clone of a checkout (a CI clone in a temporary folder), ../shared/data
# beside the checkout it was cloned from. Tests that need real data fail, naming it, where none is found.
if [ -z "${CRYOPICK_DATA:-}" ] && [ ! -d "$HERE/../shared/data" ]; then
  ORIGIN=$(git -C "$HERE" remote get-url origin 2>/dev/null || true)
  if [ -n "$ORIGIN" ] && [ -d "$ORIGIN/../shared/data" ]; then
    export CRYOPICK_DATA="$(cd "$ORIGIN/../shared/data" && pwd)"
    log "shared data: $CRYOPICK_DATA (beside the checkout this one was cloned from)"
  fi
fi

case "$JOB" in
  setup) log "ready: activate with 'source .venv/bin/activate', then run 'cryopick --help'" ;;
  demo)  exec "$VENV/bin/cryopick" demo "$@" ;;
  test)  exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" ;;
  *) echo "usage: bash setup.sh [setup|demo|test]" >&2; exit 2 ;;
esac
