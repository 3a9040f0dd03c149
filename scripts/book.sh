#!/usr/bin/env bash
# Build the course as a book (Jupyter Book < 2), executing every chapter: one command.
#   scripts/book.sh            -> book/_build/html/index.html
# Installs the `book` extra into ./.venv (scripts/setup.sh), then runs `jupyter-book build` on the
# repository root with book/_config.yml and book/_toc.yml. The build executes each chapter afresh
# (execute_notebooks: force, allow_errors: false) and fails on any warning (-W; --keep-going reports
# them all first): a chapter that raised, a broken link, a missing image. Extra arguments go to
# jupyter-book. Offline: Jupyter Book 1 ships its theme (2.x fetches one at build time).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh book
export MPLBACKEND=Agg
export DS_LAB_DASHBOARD=static   # an unattended kernel: each Dashboard draws its final PNG once
rm -rf book/_build
start=$SECONDS
.venv/bin/jupyter-book build . --config book/_config.yml --toc book/_toc.yml --path-output book \
    --builder html -W --keep-going "$@"
# Every chapter must be in the book, executed: its page exists and holds no error output.
missing=0
for notebook in notebooks/[0-9][0-9]_*.ipynb; do
    page="book/_build/html/notebooks/$(basename "${notebook%.ipynb}").html"
    if [ ! -f "$page" ]; then
        echo "book: $notebook has no page ($page)"; missing=1
    elif grep -q 'class="output traceback' "$page"; then
        echo "book: $page shows an error output"; missing=1
    fi
done
[ "$missing" = 0 ] || exit 1
echo "book built in $((SECONDS - start)) s: book/_build/html/index.html"
