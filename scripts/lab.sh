#!/usr/bin/env bash
# Open the course in JupyterLab, in a browser: scripts/lab.sh [jupyter lab arguments]
#   scripts/lab.sh                         -> installs the `lab` extra into ./.venv, opens notebooks/
#   scripts/lab.sh --no-browser --port 8899
# The dashboards are live there: each Dashboard redraws while its run trains.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh lab
unset DS_LAB_DASHBOARD   # "static" would turn the live dashboards off
exec .venv/bin/jupyter lab --notebook-dir=notebooks "$@"
