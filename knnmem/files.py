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
import stat
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
        os.chmod(tmp, _new_file_mode())  # mkstemp's 0600 would make every saved file private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _new_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_json(path: str | os.PathLike, payload: object, indent: int | None = None) -> None:
    """`payload` as JSON at `path`, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=indent)

    atomic_write(path, write)


MAX_JSON_BYTES = 64 * 2 ** 20  # a knnmem JSON file (settings, logs) is far smaller


def check_regular_file(path: str | os.PathLike, kind: str) -> None:
    """ValueError unless `path` is a regular file itself: not a symbolic link (which could lead
    outside the folder named), a device (/dev/zero reads forever), a FIFO (blocks) or a folder."""
    path = os.fspath(path)
    try:
        mode = os.lstat(path).st_mode
    except OSError as err:
        raise ValueError(f"{path} is not a readable {kind}: {err}") from err
    if stat.S_ISLNK(mode):
        raise ValueError(f"{path} is a symbolic link: knnmem reads its {kind} only from a regular file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file: cannot be a {kind}")


def _parse_json(text: str | bytes, what: str) -> object:
    """json.loads; ValueError starting with `what` ("X is not ...") if it cannot be parsed."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what}: JSON nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what}: not valid JSON ({err})") from None


def read_json(path: str | os.PathLike, kind: str) -> object:
    """The JSON value in the regular file at `path` (at most MAX_JSON_BYTES); ValueError naming
    the file as a `kind` if it cannot be one."""
    path = os.fspath(path)
    check_regular_file(path, kind)
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise ValueError(f"{path} has {os.path.getsize(path)} bytes, more than a {kind} can have ({MAX_JSON_BYTES})")
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as err:
        raise ValueError(f"{path} is not a readable {kind}: {err}") from err
    return _parse_json(text, f"{path} is not a readable {kind}")


def save_tensors_and_json(path: str | os.PathLike, tensors: dict[str, torch.Tensor], key: str,
                          meta: object) -> None:
    """One safetensors file of `tensors` with `meta` as JSON under metadata `key`, atomically."""
    tensors = {name: x.detach().contiguous().cpu() for name, x in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={key: json.dumps(meta)}))


def read_tensors_and_json(path: str | os.PathLike, key: str, kind: str) -> tuple[dict[str, torch.Tensor], object]:
    """(tensors, the JSON metadata stored under `key`, None if absent) of a safetensors file;
    ValueError naming the file as a `kind` if it cannot be read."""
    path = os.fspath(path)
    check_regular_file(path, kind)
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(key, "null")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable {kind}: {err}") from err
    return tensors, _parse_json(raw, f"{path}: its {kind} metadata is not readable")


def check_metadata_fields(meta: dict, fields: dict[str, type]) -> None:
    """Raise ValueError unless each metadata field is present and of its type (bools are not ints)."""
    for name, kind in fields.items():
        value = meta.get(name)
        if value is None or isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise ValueError(f"metadata field {name!r} must be a {kind.__name__}, got {value!r}")
