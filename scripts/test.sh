#!/usr/bin/env bash
# Set up with the test extras, then run the whole suite: unit and multi-process tests, and every
# chapter notebook under nbval. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
export MPLBACKEND=Agg
targets=(tests)
if compgen -G "notebooks/*.ipynb" >/dev/null; then
    targets+=(--nbval-lax notebooks)
fi
exec .venv/bin/python -m pytest -q "${targets[@]}" "$@"
