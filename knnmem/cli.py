"""The `knnmem` command: `knnmem eval` (perplexity), `knnmem passkey` (retrieval), `knnmem train`
(fine-tuning a retrofit) and `knnmem calibrate` (choosing the heads that read memory)."""
from __future__ import annotations

import sys

COMMANDS = ("eval", "passkey", "train", "calibrate")
USAGE = "usage: knnmem {eval,passkey,train,calibrate} [options]   (knnmem eval --help, knnmem train --help, ...)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        from . import __version__

        print(f"knnmem {__version__}")
        return
    if not argv or argv[0] not in COMMANDS:
        print(USAGE)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    if argv[0] == "eval":
        from .commands.eval import main as run
    elif argv[0] == "passkey":
        from .commands.passkey import main as run
    elif argv[0] == "calibrate":
        from .commands.calibrate import main as run
    else:
        from .commands.train import main as run
    run(argv[1:])
