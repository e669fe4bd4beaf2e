"""Reading a long document in windows: a local context under the memory, and the delayed write.

A document x[0..N) is scored in segments x[a:b) of `segment` tokens. Segment x[a:b) is read in
the window x[start:b), start = max(0, a - context): the model attends locally to `context`
tokens before the segment (0: the segment alone; `segment`: the previous segment, as in
Transformer-XL; more: a sliding window). The logits of window positions a..b-1 predict
x[a+1..b], so every token but x[0] is scored exactly once, whatever the context.

With a patched model, memory holds exactly the tokens that have left the local context: after
window x[start:b) is read, its first tokens x[start:next_start), which the next window no
longer holds, are written to memory (the delayed write; the last window writes all of itself).
No token is ever both attended locally and retrieved.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    """Window x[start:b) scoring x[a+1:b+1]; `write`: how many of its first tokens go to memory."""

    start: int
    a: int
    b: int
    write: int


def windows(n_tokens: int, segment: int, context: int) -> list[Window]:
    """The windows that read a document of `n_tokens` tokens, in order."""
    if segment <= 0 or context < 0:
        raise ValueError(f"segment must be > 0 and context >= 0, got segment={segment}, context={context}")
    spans = [(max(0, a - context), a, min(a + segment, n_tokens)) for a in range(0, n_tokens - 1, segment)]
    starts = [start for start, _, _ in spans[1:]] + [spans[-1][2]] if spans else []
    return [Window(start, a, b, next_start - start) for (start, a, b), next_start in zip(spans, starts)]


def reset_memory(model, rows: int | list[int] | None = None) -> None:
    """Clear the memory of a patched model (`model.knnmem`) or of a model with its own memory
    layers (`reset_memory()`, e.g. `MemorizingTransformer`): all rows, or the given rows."""
    handle = getattr(model, "knnmem", None)
    if handle is not None:
        handle.reset(rows)
    elif hasattr(model, "reset_memory"):
        model.reset_memory(rows)


def forward_window(model, ids: torch.Tensor, w: Window) -> torch.Tensor:
    """Logits (B, b - a, V) of window `w` of `ids` (B, N), under the caller's grad mode.

    A patched model writes only the window's tokens that leave the local context. A model that
    writes its own memory (`MemorizingTransformer`) is read with context 0: its layers keep the
    XL cache and memory themselves."""
    handle = getattr(model, "knnmem", None)
    if w.start < w.a and getattr(model, "stateful", False):
        raise ValueError("this model keeps its own memory or XL cache: read it with context 0 (a recomputed "
                         "context would be written into memory twice)")
    tokens = ids[:, w.start:w.b].to(model.device)
    if handle is None:
        logits = model(tokens, use_cache=False).logits
    else:
        with handle.writing(first=w.write):
            logits = model(tokens, use_cache=False).logits
    return logits[:, w.a - w.start:]


@torch.no_grad()
def read(model, ids: torch.Tensor, segment: int, context: int = 0) -> Iterator[tuple[Window, torch.Tensor]]:
    """Yield (window, logits of positions a..b-1) for each window of `ids` (B, N).

    If `model` is patched (`model.knnmem`), each window writes only its tokens that leave the
    local context; the caller resets the memory between documents.
    """
    for w in windows(ids.shape[-1], segment, context):
        yield w, forward_window(model, ids, w)
