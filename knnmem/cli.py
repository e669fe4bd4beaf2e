"""The `knnmem` command: `knnmem eval ...` (perplexity) and `knnmem passkey ...` (retrieval)."""
from __future__ import annotations

import sys

USAGE = "usage: knnmem {eval,passkey} [options]   (knnmem eval --help, knnmem passkey --help)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("eval", "passkey"):
        print(USAGE)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    if argv[0] == "eval":
        from .eval.run import main as run
    else:
        from .eval.passkey import main as run
    run(argv[1:])
