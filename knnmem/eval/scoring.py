"""Streaming a document through a model in segments, scoring every token exactly once.

A document x[0..N) is cut into segments x[a:b) of `segment` tokens. The logits of segment
positions a..b-1 predict x[a+1..b], so token x[b] (the first of the next segment) is scored by
the last position of the segment before it, and every token but x[0] is scored exactly once,
identically in every configuration. What differs is the context each segment is read with:

- `none`: the segment alone (positions 0..T-1).
- `xl`: the previous segment prepended as extra local context (Transformer-XL-like, recomputed).
- `long`: the model's own attention over a sliding window of `window` tokens ending at b.
- `memory`: the segment alone, through a model patched with kNN memory (`knnmem.patch`) that
  holds the document's earlier segments; cleared between documents.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

KINDS = ("none", "xl", "long", "memory")


def segment_bounds(n_tokens: int, segment: int) -> list[tuple[int, int]]:
    """[(a, b)] input segments of a document of n_tokens that together score tokens 1..N-1."""
    return [(a, min(a + segment, n_tokens)) for a in range(0, n_tokens - 1, segment)]


def context_start(kind: str, a: int, b: int, segment: int, window: int) -> int:
    """First token of the context with which segment x[a:b) is read."""
    if kind == "xl":
        return max(0, a - segment)
    if kind == "long":
        return max(0, b - window)
    return a


@torch.no_grad()
def score_document(model, ids: torch.Tensor, kind: str, segment: int, window: int = 2048,
                   on_segment: Callable[[], None] | None = None) -> torch.Tensor:
    """Negative log-likelihood (float64, nats) of tokens 1..N-1 of `ids` (N,), in order.

    For kind="memory", `model` must be patched and its memory already reset for this document.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    nll = []
    for a, b in segment_bounds(ids.numel(), segment):
        start = context_start(kind, a, b, segment, window)
        logits = model(ids[None, start:b].to(model.device), use_cache=False).logits[0, a - start:]
        targets = ids[a + 1:b + 1].to(logits.device)
        nll.append(F.cross_entropy(logits[: targets.numel()].float(), targets, reduction="none").double().cpu())
        if on_segment is not None:
            on_segment()
    return torch.cat(nll)
