"""Build ds_lab/data/code_corpus.txt: the code corpus of chapter 08, from ds_lab's own sources.

    python scripts/build_code_corpus.py            # rewrites ds_lab/data/code_corpus.txt
    python scripts/build_code_corpus.py --check    # exits 1 if the file would change

The project is Apache-2.0, so its own sources may be shipped as training text (see
ds_lab/data/README.md). The corpus is the git-tracked Python files of the packages below, in
sorted path order, each introduced by one marker line `# ==== file: <path>`. `zero` comes last, so
the last 10% of the corpus (`train_val_split`'s held-out part) is ZeRO code the model never trains on.
Run it from anywhere inside the repository; it reads the working tree of the tracked files.
"""
import argparse
import pathlib
import subprocess
import sys

PACKAGES = ("comm", "config", "data", "models", "optim", "runtime", "zero")  # ~330 KB together
MARKER = "# ==== file: "  # must match ds_lab.lab.applications.FILE_MARKER
MAX_BYTES = 400_000        # "a few hundred KB at most": small enough to ship, large enough to learn from

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "ds_lab" / "data" / "code_corpus.txt"


def source_files() -> list:
    tracked = subprocess.run(["git", "ls-files", "ds_lab"], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.split()
    chosen = []
    for package in PACKAGES:
        chosen += sorted(p for p in tracked if p.endswith(".py") and p.startswith(f"ds_lab/{package}/"))
    return chosen


def build() -> str:
    parts = []
    for path in source_files():
        text = (ROOT / path).read_text(encoding="utf-8")
        parts.append(f"{MARKER}{path}\n{text.rstrip()}\n\n")
    corpus = "".join(parts)
    size = len(corpus.encode("utf-8"))
    if size > MAX_BYTES:
        raise SystemExit(f"the corpus is {size:,} bytes, over {MAX_BYTES:,}; drop a package from PACKAGES")
    return corpus


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report whether the shipped file is up to date")
    args = parser.parse_args()
    corpus = build()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        print("up to date" if current == corpus else f"{OUTPUT.relative_to(ROOT)} is out of date; rerun without --check")
        return 0 if current == corpus else 1
    OUTPUT.write_text(corpus, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}: {len(corpus.encode('utf-8')):,} bytes, {len(source_files())} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
