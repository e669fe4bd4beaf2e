"""Long documents for evaluation and training: files, directories or globs; by default the largest
source files of the Python standard library (real long documents, code like the paper's GitHub set,
present on every machine without a download); the reproducible split by document; and pieces,
documents cut into equal-length token tensors."""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Callable

import torch

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".html", ".tex", ".json")


def stdlib_directory() -> str:
    return sysconfig.get_paths()["stdlib"]


def default_corpus(count: int = 200) -> list[str]:
    """The `count` largest .py files of the standard library (tests and vendored code excluded)."""
    root = stdlib_directory()
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("test", "tests", "idlelib", "site-packages", "__pycache__")]
        paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    paths.sort(key=lambda p: (-os.path.getsize(p), p))
    return paths[:count]


# The default documents of `knnmem eval` (held out: no setting is chosen on them): one per genre,
# each long enough (>= 32K tokens of SmolLM2's tokenizer) that memory is the only way to see their
# beginning from their end. And the calibration documents that settings are chosen on.
EVAL_DOCUMENTS = {"code": "_pydecimal.py", "prose": "pydoc_data/topics.py"}  # 61K and 172K tokens
CALIBRATION_DOCUMENTS = {"code": "tkinter/__init__.py", "prose": "pydoc_data/topics.py"}  # 44K tokens; ...
CALIBRATION_PROSE_START = 131072  # ... and topics.py from token 128K on: other help topics than the eval's first 32K


def stdlib_documents(names: dict[str, str]) -> dict[str, str]:
    """{genre: absolute path} of standard-library files named relative to the library's root."""
    return {genre: os.path.join(stdlib_directory(), name) for genre, name in names.items()}


def find_documents(patterns: list[str]) -> list[str]:
    """Expand files, directories (recursively, text-like suffixes) and glob patterns."""
    found: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            for directory, _, files in os.walk(pattern):
                found += [os.path.join(directory, f) for f in files if f.endswith(TEXT_SUFFIXES)]
        elif os.path.isfile(pattern):
            found.append(pattern)
        else:
            matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
            if not matches:
                raise FileNotFoundError(f"--data {pattern!r} matches no file or directory")
            found += matches
    return sorted(set(found))


def training_corpus(count: int = 200) -> list[str]:
    """The default training documents: `default_corpus` without the eval's held-out documents
    (`EVAL_DOCUMENTS`), so that nothing tuned or validated in training is what the eval reports."""
    held_out = set(stdlib_documents(EVAL_DOCUMENTS).values())
    return [p for p in default_corpus(count + len(held_out)) if p not in held_out][:count]


def is_validation(path: str, fraction: float = 0.5) -> bool:
    """Reproducible split by document: a hash of the file name (not its location on disk)."""
    digest = hashlib.sha256(os.path.basename(path).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(paths: list[str], fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """(train, validation) by `is_validation`; order preserved."""
    validation = [p for p in paths if is_validation(p, fraction)]
    return [p for p in paths if p not in validation], validation


def display_name(path: str) -> str:
    """How a document is named in results: relative to the standard library, or its file name
    (never an absolute path of this machine)."""
    root = stdlib_directory()
    if os.path.abspath(path).startswith(root + os.sep):
        return os.path.relpath(path, root)
    return os.path.basename(path)


def portable(value: object) -> object:
    """`value` with every absolute path in it (a string, or one in a list) named by `display_name`."""
    if isinstance(value, str) and os.path.isabs(value):
        return display_name(value)
    if isinstance(value, (list, tuple)):
        return [portable(item) for item in value]
    return value


def recorded_options(args, leave_out: tuple[str, ...] = ()) -> dict:
    """A command's options (an argparse namespace) as results record them: without `leave_out`,
    and with no absolute path of this machine."""
    return {name: portable(value) for name, value in vars(args).items() if name not in leave_out}


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def pieces(ids: torch.Tensor, length: int) -> list[torch.Tensor]:
    """Cut a document's token ids (N,) into consecutive documents of exactly `length` tokens
    (the tail shorter than `length` is dropped)."""
    return [ids[i:i + length] for i in range(0, ids.numel() - length + 1, length)]


def document_pieces(paths: list[str], encode: Callable[[str], list[int]], length: int,
                    limit: int | None = None) -> list[torch.Tensor]:
    """Pieces of `length` tokens (`pieces`) of the files at `paths`, encoded by `encode`, in
    order, at most `limit` of them."""
    documents: list[torch.Tensor] = []
    for path in paths:
        documents += pieces(torch.tensor(encode(read_text(path)), dtype=torch.long), length)
        if limit is not None and len(documents) >= limit:
            return documents[:limit]
    return documents
