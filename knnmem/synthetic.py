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


def recurring_spans(n_tokens: int, vocab_size: int, distances: list[int], span: int = 16, copied: float = 0.25,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A document with a known answer: uniformly random tokens, among which spans of `span`
    tokens recur verbatim at the given `distances` (the i-th recurrence at distances[i % len]),
    `copied` of the tokens in all. A copied token (but the first of its span) can only be
    predicted by looking back exactly its distance; every other token cannot be predicted.

    Returns (tokens (n_tokens,) int64 in [0, vocab_size), distance (n_tokens,) int64: how far back
    the token's copy lies, 0 where it is not predictable). Copies never overlap, and a copy's
    source is random filler used once (never another copy), so each predictable token has one
    source. ValueError if `copied` cannot be placed (copies and sources need 2 * copied <= 1).
    """
    if n_tokens <= 0 or vocab_size < 2 or span < 2 or not distances or not 0 < copied < 0.5:
        raise ValueError(f"need n_tokens > 0, vocab_size >= 2, span >= 2, distances, 0 < copied < 0.5; got "
                         f"{n_tokens}, {vocab_size}, {span}, {distances}, {copied}")
    if max(distances) + span > n_tokens or min(distances) < span:
        raise ValueError(f"distances must lie in [span={span}, n_tokens - span={n_tokens - span}], got {distances}")
    tokens = torch.randint(vocab_size, (n_tokens,), generator=generator)
    distance = torch.zeros(n_tokens, dtype=torch.long)
    taken = torch.zeros(n_tokens, dtype=torch.bool)  # copies and their sources
    wanted = round(copied * n_tokens / span)
    free = torch.ones(n_tokens - span + 1, dtype=torch.bool)  # free[s]: no token of [s, s + span) is taken

    def take(a: int) -> None:
        taken[a:a + span] = True
        free[max(0, a - span + 1):a + span] = False

    for i in range(wanted):
        d = distances[i % len(distances)]
        starts = (free[d:] & free[:len(free) - d]).nonzero()[:, 0] + d  # a copy at s, its source at s - d
        if not len(starts):
            raise ValueError(f"placed only {i} of {wanted} recurring spans (copied={copied} of {n_tokens} tokens, "
                             f"span {span}): lower copied")
        start = int(starts[torch.randint(len(starts), (1,), generator=generator)])
        tokens[start:start + span] = tokens[start - d:start - d + span]
        distance[start + 1:start + span] = d
        take(start - d)
        take(start)
    return tokens, distance
