#!/usr/bin/env bash
# Create ./.venv (once) and install ds_lab into it, editable. Usage: scripts/setup.sh [EXTRAS]
#   scripts/setup.sh          -> the library and the CLI
#   scripts/setup.sh test     -> plus everything the test suite and the notebooks need
# torch: if the venv has no torch >= 2.4 yet, install DS_LAB_TORCH (default 2.13.0, a CPU build
# where one is provided); a plain "torch" requirement could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch, sys; sys.exit(tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) < (2, 4))" 2>/dev/null; then
    "${pip[@]}" "torch==${DS_LAB_TORCH:-2.13.0}"
fi
if [ -n "$extras" ]; then
    "${pip[@]}" -e ".[$extras]"
else
    "${pip[@]}" -e .
fi
