"""Fine-tuning a retrofit (what `knnmem train` runs): the default memory layers, the training and
validation pieces of a corpus, and the run itself (validation before, then the training loop)."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .. import corpus
from .loop import TrainSettings, perplexity, train
from .trainable import TRAINED_FILE, read_trained


def default_layers(n_layers: int) -> list[int]:
    """A fifth of the layers, at 60-80% depth (the paper puts its memory layer near 75%)."""
    return list(range(int(0.6 * n_layers), max(int(0.8 * n_layers), int(0.6 * n_layers) + 1)))


def split_pieces(paths: list[str], encode: Callable[[str], list[int]], length: int, max_train: int | None,
                 max_validation: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(training, validation) pieces of `length` tokens of the documents at `paths`, split by
    document (`knnmem.corpus.split`), at most `max_train` (None: all) and `max_validation`."""
    train_paths, validation_paths = corpus.split(paths)
    return (corpus.document_pieces(train_paths, encode, length, max_train),
            corpus.document_pieces(validation_paths, encode, length, max_validation))


def fine_tune(model, train_docs: list[torch.Tensor], val_docs: list[torch.Tensor], settings: TrainSettings,
              output: str, resume: bool = False, info: dict | None = None, rank: int = 0) -> dict:
    """Train the patched, prepared `model` with checkpoints in `output`, recording the validation
    perplexity before training in `info` (from the checkpoint when resuming). Returns the log."""
    info = {} if info is None else info
    if resume:
        info["validation_ppl_before"] = read_trained(os.path.join(output, TRAINED_FILE))[1].get("validation_ppl_before")
    else:
        before = perplexity(model, val_docs, settings.segment, settings.context, settings.batch_size)
        if rank == 0:
            print(f"validation ppl before training: {before:.3f}")
        info["validation_ppl_before"] = before
    return train(model, train_docs, settings, val_docs, output=output, resume=resume, info=info)
