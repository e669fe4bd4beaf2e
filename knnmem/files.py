"""The one door for files: atomic writes, and safetensors files with JSON metadata.

Every format knnmem saves (a memory, a handle snapshot, knowledge, patch settings, trained
parameters, training checkpoints) is written through `atomic_write` (a crash or a full disk
leaves the previous file, never a half-written one) and read back through `read_tensors_and_json`
or `read_json`, which turn every unreadable file into a ValueError naming it. Files are data:
nothing here runs code from a file.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(tmp) into a temporary file beside `path`, then rename it over `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, payload: object, indent: int | None = None) -> None:
    """`payload` as JSON at `path`, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=indent)

    atomic_write(path, write)


def read_json(path: str | os.PathLike, kind: str) -> object:
    """The JSON value in the file at `path`; ValueError naming the file as a `kind` if unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{os.fspath(path)} is not a readable {kind}: {err}") from err


def save_tensors_and_json(path: str | os.PathLike, tensors: dict[str, torch.Tensor], key: str,
                          meta: object) -> None:
    """One safetensors file of `tensors` with `meta` as JSON under metadata `key`, atomically."""
    tensors = {name: x.detach().contiguous().cpu() for name, x in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={key: json.dumps(meta)}))


def read_tensors_and_json(path: str | os.PathLike, key: str, kind: str) -> tuple[dict[str, torch.Tensor], object]:
    """(tensors, the JSON metadata stored under `key`, None if absent) of a safetensors file;
    ValueError naming the file as a `kind` if it cannot be read."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(key, "null")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable {kind}: {err}") from err
    try:
        return tensors, json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its {kind} metadata is not valid JSON ({err})") from None


def check_metadata_fields(meta: dict, fields: dict[str, type]) -> None:
    """Raise ValueError unless each metadata field is present and of its type (bools are not ints)."""
    for name, kind in fields.items():
        value = meta.get(name)
        if value is None or isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise ValueError(f"metadata field {name!r} must be a {kind.__name__}, got {value!r}")
