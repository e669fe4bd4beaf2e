"""Synthetic data for tests and benchmarks: clustered keys, like the keys of a real model."""
from __future__ import annotations

import torch


def clustered_keys(n: int, dim: int, clusters: int = 1024, spread: float = 0.8,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, dim) float32 vectors drawn around `clusters` random unit centres with relative noise
    `spread` (keys of real attention heads are far from uniform on the sphere)."""
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=generator), dim=-1)
    labels = torch.randint(clusters, (n,), generator=generator)
    noise = torch.randn(n, dim, generator=generator) * spread / dim**0.5
    return centres[labels] + noise
