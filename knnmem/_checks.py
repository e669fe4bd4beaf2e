"""Input validation shared by the public entry points: every message names the argument."""
from __future__ import annotations

import torch


def check_tensor(name: str, x: object, ndim: int, shape_doc: str) -> torch.Tensor:
    """Raise TypeError/ValueError unless `x` is a tensor of rank `ndim` (`shape_doc` says which)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} ({ndim} dims), got {tuple(x.shape)}")
    return x


def check_floating(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def check_dim(name: str, x: torch.Tensor, dim: int, expected: int, shape_doc: str) -> None:
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name} must have shape {shape_doc} with size {expected} at dim {dim}, got {tuple(x.shape)}"
        )


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_metadata_fields(meta: dict, fields: dict[str, type]) -> None:
    """Raise ValueError unless each metadata field is present and of its type (bools are not ints)."""
    for name, kind in fields.items():
        value = meta.get(name)
        if value is None or isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise ValueError(f"metadata field {name!r} must be a {kind.__name__}, got {value!r}")
