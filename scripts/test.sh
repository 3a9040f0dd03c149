#!/usr/bin/env bash
# Set up with the test extras, then run the whole suite: unit and multi-process tests, and every
# chapter notebook under nbval. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
export MPLBACKEND=Agg
targets=(tests)
# DS_LAB_CHAPTERS_IN_BOOK=1 (.ci/run sets it, and builds the book next): the book build executes every
# chapter and fails on any error, assertion cells included, so the chapters do not run twice in CI.
if [ -z "${DS_LAB_CHAPTERS_IN_BOOK:-}" ] && compgen -G "notebooks/*.ipynb" >/dev/null; then
    targets+=(--nbval-lax notebooks)
fi
exec .venv/bin/python -m pytest -q "${targets[@]}" "$@"
