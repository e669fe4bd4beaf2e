"""Long-document perplexity with and without memory, on the same tokens (what `knnmem eval` runs):
the documents to read, the configurations, and the run that scores every document in each of
them and gathers the results (summed over processes under torchrun)."""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import corpus
from ..patch import patch, unpatch
from ..stream import windows
from ..train.trainable import load_trained
from .scoring import local_context, score_document, uses_memory

DEFAULT_CONFIGS = ["none", "xl", "long", "xl+memory"]
LONG_DOCUMENT = 16384  # default corpus: documents shorter than this (or max_tokens) are skipped
# Memories per layer and KV head of the memory configurations: the document's first 64 tokens pinned,
# then the most recent. Chosen on the calibration documents (32K tokens each) among 4K, 8K, 16K and
# 64K: the best perplexity on both genres, at 1.5x the time per token of xl (README, "Where memory
# sits"); a memory never overwritten (64K) was worse and 2.1x.
DEFAULT_MEMORY = 8192
PATCH_OPTIONS = set(inspect.signature(patch).parameters) - {"model", "max_memories"}


@dataclass(frozen=True)
class PerplexityRun:
    """What an evaluation runs. configs: kinds of `knnmem.eval.scoring`, each once; memory kinds
    with `memory` tokens of memory, and again at each other size of `memory_sweep` (named KIND@N).
    segment: scored tokens per window; window: the context of `long`; context: the local context of
    `xl` and `xl+memory` (None: one segment); max_tokens: the longest a document is (for the sums
    by segment index). Memory kinds patch the model with `knnmem.patch(model, max_memories=size,
    **patch_options)` (e.g. {"heads": a calibration's (layer, head) pairs, "topk": 8}; {}: patch's
    defaults); with a `checkpoint` (a `knnmem train` output) they run the fine-tuned retrofit,
    loaded once, instead."""

    configs: Sequence[str] = tuple(DEFAULT_CONFIGS)
    segment: int = 512
    window: int = 2048
    context: int | None = None
    max_tokens: int = 16384
    memory: int = DEFAULT_MEMORY
    memory_sweep: Sequence[int] = ()
    patch_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.patch_options) - PATCH_OPTIONS
        if unknown:
            raise ValueError(f"patch_options: {sorted(unknown)} are not options of knnmem.patch "
                             f"(choose from {sorted(PATCH_OPTIONS)}; the memory size is `memory`)")

    @property
    def segments_per_document(self) -> int:
        return math.ceil(self.max_tokens / self.segment)

    def configurations(self) -> list[tuple[str, str, int | None]]:
        """(name, kind, memory size) for every configuration to run. With a checkpoint, the memory
        configurations run last, on the fine-tuned retrofit loaded once."""
        configs = []
        for kind in self.configs:
            configs.append((kind, kind, self.memory if uses_memory(kind) else None))
            if uses_memory(kind):
                configs += [(f"{kind}@{n}", kind, n) for n in self.memory_sweep if n != self.memory]
        if self.checkpoint is not None:
            configs.sort(key=lambda c: uses_memory(c[1]))
        return configs

    def memory_for(self, model, size: int):
        """Patch `model` for a memory configuration (or load the fine-tuned checkpoint, once)."""
        if self.checkpoint is not None:
            return getattr(model, "knnmem", None) or load_trained(model, self.checkpoint)
        return patch(model, max_memories=size, **self.patch_options)


class Totals(NamedTuple):
    """One configuration's sums: `sums` holds the nll sum, the tokens, the nll sums and token
    counts by segment index (for the plot), then the nll sums and token counts by document;
    seconds: the slowest process's."""

    kind: str
    memory: int | None
    sums: torch.Tensor
    seconds: float
    memory_settings: dict | None


def select_documents(tokenizer, data: list[str] | None = None, split: str = "validation", max_docs: int = 1,
                     max_tokens: int = 16384, min_tokens: int | None = None,
                     segment: int = 512) -> list[tuple[str, torch.Tensor]]:
    """Up to `max_docs` (path, token ids cut to `max_tokens`) of the documents in `data` (files,
    directories or globs; None: the default corpus), of their `split` ("validation", "train" or
    "all"), that have at least `min_tokens` tokens (default: two segments for `data`, else
    max_tokens or LONG_DOCUMENT, the smaller). Raises ValueError if no document is long enough."""
    paths = corpus.find_documents(data) if data else corpus.default_corpus()
    if split != "all":
        train, validation = corpus.split(paths)
        paths = validation if split == "validation" else train
    min_tokens = min_tokens or (2 * segment if data else min(max_tokens, LONG_DOCUMENT))
    documents, short = [], []
    for path in paths:
        ids = tokenizer(corpus.read_text(path), add_special_tokens=False).input_ids
        if len(ids) >= min_tokens:
            documents.append((path, torch.tensor(ids[:max_tokens])))
        else:
            short.append(f"{os.path.basename(path)} ({len(ids)})")
        if len(documents) == max_docs:
            break
    if not documents:
        raise ValueError(f"no document of the {split} split has at least {min_tokens} tokens "
                         f"(tokens per document: {', '.join(short[:10]) or 'no documents'})")
    return documents


def _score_config(model, documents: dict[int, torch.Tensor], n_documents: int, kind: str, handle,
                  run: PerplexityRun, bar: tqdm) -> tuple[torch.Tensor, float]:
    """(sums as in `Totals`, seconds) of this process's `documents` ({index: ids}) in one configuration."""
    n_positions = run.segments_per_document
    sums = torch.zeros(2 + 2 * n_positions + 2 * n_documents, dtype=torch.float64)
    by_document = 2 + 2 * n_positions
    start = time.perf_counter()
    for index, ids in documents.items():
        if handle is not None:
            handle.reset()
        nll = score_document(model, ids, kind, run.segment, run.window, on_segment=lambda: bar.update(),
                             context=run.context)
        sums[0] += nll.sum()
        sums[1] += nll.numel()
        for position, chunk in enumerate(nll.split(run.segment)):
            sums[2 + position] += chunk.sum()
            sums[2 + n_positions + position] += chunk.numel()
        sums[by_document + index] += nll.sum()
        sums[by_document + n_documents + index] += nll.numel()
    return sums, time.perf_counter() - start


def run_configs(model, documents: list[torch.Tensor], run: PerplexityRun, world: int = 1, rank: int = 0,
                on_config: Callable[[dict[str, Totals]], None] | None = None) -> dict[str, Totals]:
    """Score every configuration of `run` on this process's share of `documents` (token ids: every
    `world`-th from `rank`); with `world` > 1 processes, the sums are added up over them (seconds:
    the slowest). on_config(totals so far) is called after each configuration."""
    configs = run.configurations()
    mine = {i: ids for i, ids in enumerate(documents) if i % world == rank}
    segments = sum(len(windows(ids.numel(), run.segment, 0)) for ids in mine.values())
    bar = tqdm(total=segments * len(configs), desc="eval", unit="seg", disable=rank != 0)
    totals = {}
    for name, kind, size in configs:
        bar.set_description(name)
        handle = None
        if uses_memory(kind):
            handle = run.memory_for(model, size)
            size = handle.max_memories
        sums, elapsed = _score_config(model, mine, len(documents), kind, handle, run, bar)
        seconds = torch.tensor([elapsed], dtype=torch.float64)
        if handle is not None and run.checkpoint is None:
            unpatch(model)
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        totals[name] = Totals(kind, size, sums, float(seconds), handle.settings if handle is not None else None)
        if on_config is not None:
            on_config(totals)
    bar.close()
    return totals


def config_results(totals: dict[str, Totals], run: PerplexityRun, names: list[str]) -> dict[str, dict]:
    """Perplexity, tokens, speed, perplexity by segment index and by document (`names`) of each
    configuration."""
    n_positions, n_documents = run.segments_per_document, len(names)
    results = {}
    for name, (kind, size, sums, seconds, memory_settings) in totals.items():
        nll, tokens = sums[0].item(), int(sums[1].item())
        counts = sums[2 + n_positions:2 + 2 * n_positions]
        by_document = sums[2 + 2 * n_positions:]
        results[name] = {
            "kind": kind, "memory": size, "memory_settings": memory_settings,
            "local_context": local_context(kind, run.segment, run.window, run.context),
            "ppl": math.exp(nll / tokens), "nll_sum": nll, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds,
            "ppl_by_segment": [math.exp(s / c) for s, c in zip(sums[2:2 + n_positions].tolist(), counts.tolist()) if c],
            "ppl_by_document": {document: math.exp(s / c) for document, s, c in
                                zip(names, by_document[:n_documents].tolist(), by_document[n_documents:].tolist())},
        }
    return results


def evaluate_perplexity(model, description: str, documents: list[tuple[str, torch.Tensor]], run: PerplexityRun,
                        settings: dict | None = None, world: int = 1, rank: int = 0,
                        on_result: Callable[[dict], None] | None = None) -> dict:
    """The result of `knnmem eval`: every configuration of `run` over `documents` ((path, ids),
    from `select_documents`; process `rank` of `world` reads its share). `settings` is recorded
    as given. on_result(result so far) is called after each configuration (partial results)."""
    names = [corpus.display_name(path) for path, _ in documents]
    if documents:  # per-position sums are sized by the longest document read, never by the option alone
        run = dataclasses.replace(run, max_tokens=min(run.max_tokens, max(ids.numel() for _, ids in documents)))

    def result(totals: dict[str, Totals]) -> dict:
        return {"model": description,
                "documents": [{"name": name, "tokens": ids.numel()} for name, (_, ids) in zip(names, documents)],
                "world_size": world, "settings": settings or {}, "configs": config_results(totals, run, names)}

    totals = run_configs(model, [ids for _, ids in documents], run, world, rank,
                         on_config=None if on_result is None else lambda partial: on_result(result(partial)))
    return result(totals)
