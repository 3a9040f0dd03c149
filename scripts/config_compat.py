"""Write docs/config_compatibility.md: every DeepSpeed config key, supported or refused by ds_lab, and why.

    python scripts/config_compat.py            # rewrite the file
    python scripts/config_compat.py --check    # exit 1 if the committed file is out of date

The table comes from ds_lab's config schema (ds_lab/lab/compat.py); tests/test_compat.py runs the check.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from ds_lab.lab.compat import compatibility_markdown

TARGET = pathlib.Path(__file__).resolve().parent.parent / "docs" / "config_compatibility.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file differs")
    args = parser.parse_args(argv)
    text = compatibility_markdown()
    if args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET.name} is out of date: run python scripts/config_compat.py", file=sys.stderr)
            return 1
        print(f"{TARGET.name} is up to date")
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
