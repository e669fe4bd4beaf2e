"""Shared helpers of the benchmark scripts: machine description and JSON output."""
from __future__ import annotations

import json
import os
import time


def machine_info() -> dict:
    """The eval's environment record (platform, versions, device) plus the Triton version."""
    from knnmem.eval.report import environment

    try:
        import triton

        return {**environment(), "triton": triton.__version__}
    except ImportError:
        return {**environment(), "triton": None}


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls of fn(), in seconds (CPU timing: best-of filters noise)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
