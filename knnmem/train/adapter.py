"""`train_adapter`: memorising documents into an attached `ResidualMemory` (`knnmem.adapters`)
through the `knnmem.train` loop, with every other parameter frozen."""
from __future__ import annotations

import torch
from torch import nn

from .. import adapters
from ..adapters import attached
from ..corpus import pieces
from .loop import TrainSettings, train


def train_adapter(model: nn.Module, documents: list[torch.Tensor], settings: TrainSettings,
                  piece_length: int | None = None, progress: bool = True) -> dict:
    """Memorise `documents` (1-D token tensors of any lengths) into the model's attached
    ResidualMemory, with every other parameter frozen, through the `knnmem.train` loop.

    The documents are joined into one token stream and cut into training pieces of `piece_length`
    tokens (default: settings.segment + settings.context + 1; the tail is a last piece ending with
    the stream). Returns the training log. The model's other parameters get back their previous
    requires_grad afterwards.
    """
    adapter = attached(model)
    if adapter is None:
        raise ValueError("train_adapter needs a model with a ResidualMemory attached (knnmem.adapters.attach)")
    if not documents or any(not isinstance(d, torch.Tensor) or d.ndim != 1 for d in documents):
        raise ValueError("documents must be a non-empty list of 1-D token tensors")
    length = piece_length or settings.segment + settings.context + 1
    stream = torch.cat([d.long() for d in documents])
    if stream.numel() < length:
        raise ValueError(f"the documents hold {stream.numel()} tokens, fewer than one piece of {length}")
    chunks = pieces(stream, length)
    if stream.numel() % length:  # the tail, as a last piece that ends with the stream
        chunks.append(stream[-length:])
    own = {id(p) for p in adapter.parameters()}
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in own)
        return train(model, chunks, settings, progress=progress)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(previous[name])
        model.eval()


# `knnmem.adapters.train_adapter`, the name user scripts know, stays: adapters.py sits below train/
# (model surgery only), so the name is given to it from here (`import knnmem` imports knnmem.train).
adapters.train_adapter = train_adapter
