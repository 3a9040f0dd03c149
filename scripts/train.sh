#!/usr/bin/env bash
# Set up, then run the main job: `ds-lab train` (2 real processes, the shipped corpus, then each
# rank's memory ledger and the comm summary). Extra arguments go to `ds-lab train`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/ds-lab train "$@"
