"""Reading a long document in windows: a local context under the memory, and the delayed write.

A document x[0..N) is scored in segments x[a:b) of `segment` tokens. Segment x[a:b) is read in
the window x[start:b), start = max(0, a - context): the model attends locally to `context`
tokens before the segment (0: the segment alone; `segment`: the previous segment, as in
Transformer-XL; more: a sliding window). The logits of window positions a..b-1 predict
x[a+1..b], so every token but x[0] is scored exactly once, whatever the context.

With a patched model, memory holds exactly the tokens that have left the local context: after
window x[start:b) is read, its first tokens x[start:next_start), which the next window no
longer holds, are written to memory (the delayed write; the last window writes all of itself).
No token is ever both attended locally and retrieved. `sinks` > 0 also keeps the document's first
`sinks` tokens in every window (StreamingLLM's attention sinks); they never enter memory.

Two readers compute this:
- recomputing (`forward_window`): each window is run whole, its context recomputed (the context
  tokens see only the window: a context of C costs C more tokens per segment);
- cached (`SlidingCache`, the default for rotary Hugging Face models): the local context is the
  model's KV cache, so every token goes through the model once, and each cached token's state
  was computed with its own context (as in Transformer-XL). After each segment the cache keeps
  the sinks and the last `context` tokens; the evicted ones go to memory. Kept keys are rotated
  back so that the cache always sits at positions 0..len-1 (relative distances unchanged; the
  model never sees positions beyond sinks + context + segment).
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import hf
from .positions import undo_rotary


@dataclass(frozen=True)
class Window:
    """Window x[start:b) scoring x[a+1:b+1]; `write`: how many of its first tokens go to memory."""

    start: int
    a: int
    b: int
    write: int


def windows(n_tokens: int, segment: int, context: int, sinks: int = 0) -> list[Window]:
    """The windows that read a document of `n_tokens` tokens, in order. With `sinks`, a window
    x[start:b) with start > 0 is read after x[0:sinks]; `write` counts from `start`."""
    if segment <= 0 or context < 0 or sinks < 0:
        raise ValueError(f"segment must be > 0, context and sinks >= 0, got segment={segment}, context={context}, "
                         f"sinks={sinks}")
    spans = [(a - context if a - context > sinks else 0, a, min(a + segment, n_tokens))
             for a in range(0, n_tokens - 1, segment)]
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


def forward_window(model, ids: torch.Tensor, w: Window, sinks: int = 0) -> torch.Tensor:
    """Logits (B, b - a, V) of window `w` of `ids` (B, N), recomputed whole, under the caller's
    grad mode (the recomputing reader).

    A patched model writes only the window's tokens that leave the local context. A model that
    writes its own memory (`MemorizingTransformer`) is read with context 0: its layers keep the
    XL cache and memory themselves."""
    handle = getattr(model, "knnmem", None)
    if w.start < w.a and getattr(model, "stateful", False):
        raise ValueError("this model keeps its own memory or XL cache: read it with context 0 (a recomputed "
                         "context would be written into memory twice)")
    prepended = min(sinks, w.start)  # sinks read before a window that no longer holds them
    tokens = ids[:, w.start:w.b]
    if prepended:
        tokens = torch.cat([ids[:, :prepended], tokens], dim=1)
    tokens = tokens.to(model.device)
    n_sinks = min(sinks, tokens.shape[1])
    if handle is None:
        logits = model(tokens, use_cache=False).logits
    elif n_sinks == 0 or n_sinks == tokens.shape[1]:
        with handle.writing(first=w.write if n_sinks == 0 else 0):
            logits = model(tokens, use_cache=False).logits
    else:  # sinks never enter memory: read them frozen into a KV cache, then the rest writing
        written_sinks = 0 if prepended else n_sinks
        cache, argument = _new_cache(model), cache_argument(model)
        with handle.frozen():
            head = model(tokens[:, :n_sinks], use_cache=True, **{argument: cache}).logits
        with handle.writing(first=max(0, w.write - written_sinks)):
            rest = model(tokens[:, n_sinks:], use_cache=True, **{argument: cache}).logits
        logits = torch.cat([head, rest], dim=1)
    return logits[:, tokens.shape[1] - (w.b - w.a):]


def cache_argument(model) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def can_cache(model) -> bool:
    """Whether the cached reader can read `model`: a transformers model with rotary positions
    (absolute position embeddings cannot be moved, so GPT-2 is recomputed)."""
    return (hasattr(model, "config") and not getattr(model, "stateful", False)
            and hf.rotary_embedding(model) is not None)


class SlidingCache:
    """The cached reader's local context: the model's KV cache, holding the first `sinks` tokens
    and the last `context` tokens read; what leaves it goes to the memory of a patched model.

    Use: `logits = cache.forward(tokens)` for each segment in order (B, T) -> (B, T, V).
    """

    def __init__(self, model, context: int, sinks: int = 0) -> None:
        if not can_cache(model):
            raise ValueError(f"{type(model).__name__} cannot be read with a KV cache (needs rotary positions)")
        self.model, self.context, self.sinks = model, context, sinks
        self.handle = getattr(model, "knnmem", None)
        self.rotary = hf.rotary_embedding(model)
        self.cache = _new_cache(model)
        self._argument = cache_argument(model)

    def __len__(self) -> int:
        return self.cache.get_seq_length()

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of `tokens` (B, T) after the cached context; then evicts what leaves it (a
        reader: no gradients)."""
        tokens = tokens.to(self.model.device)
        if self.handle is None:
            logits = self.model(tokens, use_cache=True, **{self._argument: self.cache}).logits
        else:
            with self.handle.frozen():  # memory is written at eviction, below
                logits = self.model(tokens, use_cache=True, **{self._argument: self.cache}).logits
        self.evict()
        return logits

    @torch.no_grad()
    def evict(self, keep: int | None = None) -> None:
        """Drop all but the sinks and the last `keep` (default: context) tokens, writing the dropped
        ones to memory, and rotate the kept ones back to follow the sinks."""
        keep = self.context if keep is None else keep
        length = len(self)
        sinks = min(self.sinks, length)
        first_kept = max(sinks, length - keep)
        n = first_kept - sinks
        if n <= 0:
            return
        if self.handle is not None:
            self.handle.add_from_cache(self.cache, sinks, n)
        if first_kept < length:  # the angles of a shift by n positions, shared by every layer
            k = self.cache.layers[0].keys
            cos, sin = self.rotary(k, torch.full((k.shape[0], 1), n, device=k.device))
            scaling = getattr(self.rotary, "attention_scaling", 1.0)
            cos, sin = cos / scaling, sin / scaling
        for layer in self.cache.layers:
            k, v = layer.keys, layer.values
            kept_k = k[:, :, first_kept:]
            if kept_k.shape[2]:
                kept_k = undo_rotary(kept_k, cos, sin)  # n positions earlier
            layer.keys = torch.cat([k[:, :, :sinks], kept_k], dim=2)
            layer.values = torch.cat([v[:, :, :sinks], v[:, :, first_kept:]], dim=2)


DEFAULT_SINKS = 4  # StreamingLLM's attention sinks, kept by the cached reader's sliding window


def default_sinks(model, context: int, cached: bool | None = None) -> int:
    """Sinks a reader keeps by default: DEFAULT_SINKS for the cached reader with a local context
    (without them a pretrained model's sliding window loses its attention sink: pydoc.py, xl,
    SmolLM2: perplexity 13.46 without sinks, 8.31 with 4, 8.25 recomputed; see the README), else 0
    (a recomputed window starts afresh, its first token is a sink)."""
    cached = can_cache(model) if cached is None else cached
    return DEFAULT_SINKS if cached and context > 0 else 0


@torch.no_grad()
def read(model, ids: torch.Tensor, segment: int, context: int = 0, sinks: int | None = None,
         cached: bool | None = None) -> Iterator[tuple[Window, torch.Tensor]]:
    """Yield (window, logits of positions a..b-1) for each window of `ids` (B, N).

    sinks: the document's first tokens kept in every window (None: `default_sinks`).
    cached: None = the cached reader where the model allows it (`can_cache`), else recomputing.
    If `model` is patched (`model.knnmem`), memory receives exactly the tokens that leave the
    local context; the caller resets the memory between documents.
    """
    if cached is None:
        cached = can_cache(model)
    if sinks is None:
        sinks = default_sinks(model, context, cached)
    spans = windows(ids.shape[-1], segment, context, sinks)
    if not cached:
        for w in spans:
            yield w, forward_window(model, ids, w, sinks)
        return
    cache = SlidingCache(model, context, sinks)
    for i, w in enumerate(spans):
        logits = cache.forward(ids[:, w.a:w.b])
        if i == len(spans) - 1:
            cache.evict(keep=0)  # the last window writes all of itself, as the recomputing reader does
        yield w, logits
