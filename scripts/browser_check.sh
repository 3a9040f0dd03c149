#!/usr/bin/env bash
# The course in a real browser: JupyterLab + headless Chromium run chapter 02 and take screenshots.
#   scripts/browser_check.sh        -> tests/browser/test_lab_browser.py; prints the screenshot folder
# Installs Debian's chromium with apt-get when no chromium is on PATH (Playwright's own browser
# download is not reachable here), playwright with pip, and the `test,lab` extras; Playwright
# drives the system chromium (DS_LAB_CHROMIUM). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
chromium="${DS_LAB_CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
if [ -z "$chromium" ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium
    chromium="$(command -v chromium)"
fi
scripts/setup.sh "test,lab"
.venv/bin/python -m pip install --quiet --disable-pip-version-check playwright
export DS_LAB_CHROMIUM="$chromium" DS_LAB_BROWSER=1 PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
exec .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/browser "$@"
