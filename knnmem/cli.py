"""The `knnmem` command: `knnmem eval ...` (see `knnmem eval --help`)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] != "eval":
        print("usage: knnmem eval [options]   (knnmem eval --help for the options)")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    from .eval.run import main as run_eval

    run_eval(argv[1:])
