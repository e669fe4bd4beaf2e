"""Scoring a document's tokens exactly once, in every configuration, with `knnmem.stream`.

The configurations differ only in the local context each segment is read with, and in memory:

- `none`: the segment alone.
- `xl`: the previous segment as extra local context (Transformer-XL); or any `context` of tokens.
- `long`: the model's own attention over a sliding window of `window` tokens (by default its
  native context) ending with the segment.
- `memory`: the segment alone, through the patched model, whose memory holds every earlier token.
- `xl+memory`: the local context of `xl`, and memory holding every token before it.

Rotary models are read by the cached reader (`knnmem.stream`: each token through the model once),
which keeps the document's first 4 tokens (attention sinks) in every local context: `xl` and `long`
are StreamingLLM's sinks + sliding window, at 1,024 tokens and at the native context.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..stream import default_sinks, read

KINDS = ("none", "xl", "long", "memory", "xl+memory")


def uses_memory(kind: str) -> bool:
    return kind.endswith("memory")


def local_context(kind: str, segment: int, window: int, context: int | None = None) -> int:
    """Tokens of local context before each segment (`xl` kinds: `context`, one segment by default;
    `long`: `window` in all, the native context by default; with the cached reader every kind with
    a local context also keeps 4 sinks)."""
    if kind in ("xl", "xl+memory"):
        return segment if context is None else context
    if kind == "long":
        return max(0, window - segment)
    return 0


@torch.no_grad()
def score_document(model, ids: torch.Tensor, kind: str, segment: int, window: int = 2048,
                   on_segment: Callable[[], None] | None = None, context: int | None = None) -> torch.Tensor:
    """Negative log-likelihood (float64, nats) of tokens 1..N-1 of `ids` (N,), in order.
    context: the local context of the `xl` kinds (default: one segment).

    For memory kinds, `model` must be patched and its memory already reset for this document.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if uses_memory(kind) != (getattr(model, "knnmem", None) is not None):
        raise ValueError(f"kind {kind!r} needs a model {'patched' if uses_memory(kind) else 'not patched'} by knnmem")
    context = local_context(kind, segment, window, context)
    sinks = default_sinks(model, context)
    if kind == "long":  # the window holds the sinks too, so that no position exceeds `window`
        context = max(0, context - sinks)
    nll = []
    for w, logits in read(model, ids[None], segment, context, sinks):
        targets = ids[w.a + 1:w.b + 1].to(logits.device)
        nll.append(F.cross_entropy(logits[0, : targets.numel()].float(), targets, reduction="none").double().cpu())
        if on_segment is not None:
            on_segment()
    return torch.cat(nll)
