"""Input validation shared by the public entry points: every message names the argument.

Public entries check their arguments once with these; inner calls trust what was checked."""
from __future__ import annotations

import math
from collections.abc import Collection

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


def check_finite_tensors(where: str, tensors: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first tensor of `tensors` that is not floating point and finite."""
    for name, x in tensors.items():
        if not x.is_floating_point():
            raise ValueError(f"{where}: {name} must be floating point, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{where}: {name} contains NaN or inf values")


def check_dim(name: str, x: torch.Tensor, dim: int, expected: int, shape_doc: str) -> None:
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name} must have shape {shape_doc} with size {expected} at dim {dim}, got {tuple(x.shape)}"
        )


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` if it is an int (not a bool) in [minimum, maximum] (either bound may be None)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value
    if minimum is not None and maximum is not None:
        wanted = f"an integer in [{minimum}, {maximum}]"
    elif minimum == 1:
        wanted = "a positive integer"
    elif minimum == 0:
        wanted = "a non-negative integer"
    elif minimum is not None:
        wanted = f"an integer >= {minimum}"
    else:
        wanted = "an integer" if maximum is None else f"an integer <= {maximum}"
    raise ValueError(f"{name} must be {wanted}, got {value!r}")


def check_positive_int(name: str, value: object) -> int:
    return check_int(name, value, minimum=1)


def check_choice(name: str, value: object, choices: Collection) -> object:
    """`value` if it is one of `choices`."""
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_number(name: str, value: object, allow_inf: bool = False) -> float:
    """`value` as a float if it is a real number (not a bool), finite unless `allow_inf`; never NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or \
            (not allow_inf and math.isinf(value)):
        raise ValueError(f"{name} must be a {'number' if allow_inf else 'finite number'}, got {value!r}")
    return float(value)
