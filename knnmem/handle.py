"""The memory of a patched model: its settings (`PatchSettings`) and its state (`MemoryHandle`).

`knnmem.patch` builds one `MemoryHandle` per model (at `model.knnmem`). It holds one `KNNMemory`
per patched layer (created on first use), the optional knowledge memory, the user API (reset,
document, frozen, save/load, memorize) and `attend`, the step every patched layer runs:

    memory_q = placement.memory_query(q)          (only if memory or knowledge is non-empty)
    indices  = KNNMemory.search(memory_q, topk)   (-1 = empty slot)
    extra    = KnowledgeMemory.attend(memory_q)   (the knowledge branch, if any)
    out      = knn_attention_core(q, k, v, memory, indices, extra, ...)
    KNNMemory.add(placement.stored_keys(k)[:n], v[:n])   n = tokens leaving the local context
"""
from __future__ import annotations

import contextlib
import math
import warnings
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from . import hf
from ._checks import check_choice, check_int, check_positive_int
from .files import read_json, write_json
from .functional import LOGITS, MODES, check_memory_bias, knn_attention_core, local_attention
from .knowledge import Collector, KnowledgeMemory, Storage, texts_to_ids
from .memory import DEFAULT_PINNED, KNNMemory, check_memory_options, memory_for_batch
from .positions import POLICIES, RotaryPlacement

GATE, SCALE = "knn_gate", "knn_memory_scale"  # the parameters `patch` adds to each memory layer
DEFAULT_DISTANCE = 2048  # where memories sit: beyond the default local window (ablation: README)
DEFAULT_TOPK = 8  # memories retrieved per query and head (ablation: README)
DEFAULT_NEIGHBOURS = 0  # stored tokens read on each side of a hit (ablation: README)
DEFAULT_QUERY_BLOCK = 1  # consecutive queries that share one search (ablation: README)
_HANDLE_FORMAT = 2
_LAYER_FILE = re.compile(r"layer_(\d+)\.[0-9a-f]{12}\.safetensors")


@dataclass(frozen=True)
class PatchSettings:
    """The settings of a patched model (the keyword arguments of `knnmem.patch` but gate_init),
    checked once when built; saved by `save_patch` and `knnmem train` checkpoints."""

    layers: tuple[int, ...]
    topk: int = DEFAULT_TOPK
    max_memories: int = 65536
    mode: str = "joint"
    logits: str = "raw"
    position: str = "constant"
    distance: int = DEFAULT_DISTANCE
    memory_backend: str = "auto"
    pinned: int = DEFAULT_PINNED
    heads: tuple[tuple[int, int], ...] | None = None  # (layer, query head) pairs with memory; None: all
    memory_bias: float = 0.0  # log-weight of every memory in the joint softmax (`knnmem.functional`)
    query_block: int = DEFAULT_QUERY_BLOCK  # consecutive queries sharing one search (`search_blocks`)
    neighbours: int = DEFAULT_NEIGHBOURS  # stored tokens read on each side of every hit (`KNNMemory.with_neighbours`)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ValueError(f"layers must be a non-empty list of layer indices, got {self.layers!r}")
        for i in self.layers:
            check_int("layers", i, minimum=0)
        if self.heads is not None:
            if not isinstance(self.heads, tuple) or not self.heads:
                raise ValueError(f"heads must be a non-empty list of (layer, head) pairs, got {self.heads!r}")
            for pair in self.heads:
                if not isinstance(pair, tuple) or len(pair) != 2:
                    raise ValueError(f"heads must be (layer, query head) pairs, got {pair!r}")
                check_int("heads (layer)", pair[0], minimum=0)
                check_int("heads (head)", pair[1], minimum=0)
            if sorted({layer for layer, _ in self.heads}) != list(self.layers):
                raise ValueError(f"heads name layers {sorted({layer for layer, _ in self.heads})}, "
                                 f"the patched layers are {list(self.layers)}")
        check_positive_int("topk", self.topk)
        check_choice("mode", self.mode, MODES)
        check_choice("logits", self.logits, LOGITS)
        check_choice("position", self.position, POLICIES)
        check_int("distance", self.distance, minimum=0)
        check_memory_options(self.max_memories, self.memory_backend, self.pinned)
        check_memory_bias(self.memory_bias, self.mode)
        check_int("neighbours", self.neighbours, minimum=0)
        check_positive_int("query_block", self.query_block)

    def as_dict(self) -> dict:
        """JSON-ready keyword arguments of `knnmem.patch`."""
        heads = None if self.heads is None else [list(pair) for pair in self.heads]
        return {**asdict(self), "layers": list(self.layers), "heads": heads}

    def memory_heads(self, layer: int, n_heads: int) -> list[int]:
        """The query heads of `layer` that read memory."""
        if self.heads is None:
            return list(range(n_heads))
        return sorted(head for i, head in self.heads if i == layer)


@dataclass(frozen=True)
class HeadPlan:
    """How a layer with memory in some of its query heads runs: the KV heads serving them (the
    store holds only those), all query heads of those KV heads' groups (attending together; the
    ones without memory retrieve nothing), the heads searched, and the other heads (plain local
    attention)."""

    kv: torch.Tensor  # (Hkv',) the KV heads stored
    grouped: torch.Tensor  # (Hq',) the query heads attending with the store
    searched: torch.Tensor  # (Hkv' * m,) positions in `grouped` of the heads with memory, m per stored KV
    # head (m: the most any KV head serves; a KV head with fewer repeats its first): only they search
    others: torch.Tensor  # (Hq - Hq',) query heads that never read memory

    @classmethod
    def make(cls, memory_heads: list[int], n_heads: int, kv_heads: int) -> "HeadPlan | None":
        """None when every head reads memory."""
        if len(memory_heads) == n_heads:
            return None
        group = n_heads // kv_heads
        kv = sorted({head // group for head in memory_heads})
        grouped = [kv_head * group + j for kv_head in kv for j in range(group)]
        others = [head for head in range(n_heads) if head not in grouped]
        served = [[grouped.index(h) for h in sorted(memory_heads) if h // group == kv_head] for kv_head in kv]
        m = max(len(heads) for heads in served)
        searched = [heads[j] if j < len(heads) else heads[0] for heads in served for j in range(m)]
        return cls(torch.tensor(kv), torch.tensor(grouped), torch.tensor(searched), torch.tensor(others, dtype=torch.long))


class MemoryHandle:
    """The memory of a patched model: one `KNNMemory` per patched layer, created on first use.

    The write rule: every forward of a memory layer writes its new tokens to memory after attending
    (inside `writing(first)` only the first ones; inside `frozen()` none). A call that carries a KV
    cache and writes warns once: its cache already holds what it would write. `reset()` (or
    `document()`) starts a new document; nothing else forgets."""

    def __init__(self, model: nn.Module, settings: PatchSettings, placement: RotaryPlacement | None,
                 previous_attn_implementation: str, kv_heads: int, head_dim: int) -> None:
        self.model, self.patch_settings, self.placement = model, settings, placement
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.previous_attn_implementation = previous_attn_implementation
        n_heads = model.config.num_attention_heads
        self.plans = {layer: HeadPlan.make(settings.memory_heads(layer, n_heads), n_heads, kv_heads)
                      for layer in settings.layers}  # None: memory in every head of the layer
        self.memories: dict[int, KNNMemory] = {}
        self.last_indices: dict[int, torch.Tensor] = {}  # layer -> (B, Hq, T, topk) of the last call
        self.write_first: int | None = None  # None: every call writes all its new tokens
        self.training: dict | None = None  # what knnmem.train.prepare made trainable (saved with it)
        self._knowledge: KnowledgeMemory | None = None
        self._memorizing: Collector | None = None  # what memorize() collects of a text
        self._warned_cache_write = False

    # The settings most callers read.
    layers = property(lambda self: list(self.patch_settings.layers))
    topk = property(lambda self: self.patch_settings.topk)
    max_memories = property(lambda self: self.patch_settings.max_memories)
    mode = property(lambda self: self.patch_settings.mode)
    logits = property(lambda self: self.patch_settings.logits)
    pinned = property(lambda self: self.patch_settings.pinned)

    def __repr__(self) -> str:
        stored = {i: m.counts.tolist() for i, m in sorted(self.memories.items())}
        return f"MemoryHandle({self.patch_settings}, stored per layer and row={stored or 'nothing yet'})"

    @property
    def settings(self) -> dict:
        """The keyword arguments of `patch` that made this handle (saved by `save_patch`)."""
        return self.patch_settings.as_dict()

    # ------------------------------------------------------------------ user API
    def reset(self, rows: int | list[int] | None = None) -> None:
        """Forget all memories, or those of the given batch rows (new documents there)."""
        for memory in self.memories.values():
            memory.clear(rows)

    @contextlib.contextmanager
    def document(self) -> Iterator["MemoryHandle"]:
        """`with mem.document(): ...` reads one document (batch) with fresh memory."""
        self.reset()
        try:
            yield self
        finally:
            self.reset()

    @contextlib.contextmanager
    def writing(self, first: int) -> Iterator["MemoryHandle"]:
        """Within the block, each memory layer writes only the `first` new tokens of each call:
        the tokens that leave the local context (the delayed write; `knnmem.stream` computes it)."""
        check_int("first", first, minimum=0)
        previous, self.write_first = self.write_first, first
        try:
            yield self
        finally:
            self.write_first = previous

    def frozen(self) -> contextlib.AbstractContextManager["MemoryHandle"]:
        """Read memory without writing to it, e.g. around `generate()`, whose KV cache already
        holds the prompt (writing it would let the model see those tokens twice)."""
        return self.writing(first=0)

    def stats(self) -> dict:
        placement = self.placement
        return {
            "layers": self.layers, "topk": self.topk, "mode": self.mode, "logits": self.logits,
            "position": placement.policy if placement else None, "distance": placement.distance if placement else None,
            "stored_per_row": {i: m.counts.tolist() for i, m in sorted(self.memories.items())},
            "backend": {i: m.backend for i, m in sorted(self.memories.items())},
            "bytes": sum(m.keys.nbytes + m.values.nbytes for m in self.memories.values()),
            "knowledge": repr(self._knowledge) if self._knowledge is not None else None,
        }

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Write every layer's memory into `directory` as one snapshot: layer files named by a fresh
        snapshot id, then `handle.json` naming them (written atomically, last). An interrupted save
        leaves the previous snapshot loadable. Then the files of the snapshot that `handle.json`
        named before are removed, and only those: a concurrent save into the same folder never
        loses its files (the last `handle.json` written wins)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        previous = self._snapshot_files(directory)
        snapshot = uuid.uuid4().hex[:12]
        files = {}
        for i, memory in sorted(self.memories.items()):
            files[str(i)] = f"layer_{i}.{snapshot}.safetensors"
            memory.save(os.path.join(directory, files[str(i)]))
        write_json(os.path.join(directory, "handle.json"),
                   {"format_version": _HANDLE_FORMAT, "layers": self.layers, "files": files})
        for name in previous - set(files.values()):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))

    @staticmethod
    def _snapshot_files(directory: str) -> set[str]:
        """The layer files named by the snapshot in `directory` (none if it has no readable one)."""
        try:
            meta = read_json(os.path.join(directory, "handle.json"), "knnmem handle file")
        except ValueError:
            return set()
        files = meta.get("files") if isinstance(meta, dict) else None
        if not isinstance(files, dict):
            return set()
        return {name for name in files.values() if isinstance(name, str) and _LAYER_FILE.fullmatch(name)}

    def load(self, directory: str | os.PathLike) -> None:
        """Read a snapshot written by `save`. Everything is checked (names stay inside `directory`,
        each memory matches this handle's layers, heads, head_dim, capacity and logits) before
        the current memories are replaced; any problem raises ValueError."""
        directory = os.fspath(directory)
        path = os.path.join(directory, "handle.json")
        meta = read_json(path, "knnmem handle file")
        if not isinstance(meta, dict) or meta.get("format_version") != _HANDLE_FORMAT:
            raise ValueError(f"{path}: not a knnmem handle file of format {_HANDLE_FORMAT}")
        if meta.get("layers") != self.layers:
            raise ValueError(f"{path} holds memories of layers {meta.get('layers')}, this model is patched at {self.layers}")
        files = meta.get("files")
        if not isinstance(files, dict):
            raise ValueError(f"{path}: field 'files' must map layer indices to file names")
        device = next(self.model.parameters()).device
        expected = {"head_dim": self.head_dim, "max_memories": self.max_memories,
                    "pinned": self.pinned, "normalize": self.logits == "normalized"}
        memories = {}
        for layer, name in files.items():
            match = _LAYER_FILE.fullmatch(name) if isinstance(name, str) else None
            if match is None or match.group(1) != layer or int(layer) not in self.layers:
                raise ValueError(f"{path}: entry {layer!r}: {name!r} is not a memory file of a patched layer "
                                 "(layer_<i>.<snapshot>.safetensors, in this folder)")
            memory = KNNMemory.load(os.path.join(directory, name), device=device)
            for field, value in {**expected, "heads": self._stored_heads(int(layer))}.items():
                if getattr(memory, field) != value:
                    raise ValueError(f"{name}: {field}={getattr(memory, field)} does not match this handle's {value}")
            memories[int(layer)] = memory
        self.memories = memories

    # ------------------------------------------------------------------ knowledge memory
    @property
    def knowledge(self) -> KnowledgeMemory | None:
        """The knowledge memory read by every memory layer besides the document memory (None: none).
        Assign a `KnowledgeMemory` (e.g. `KnowledgeMemory.load(path)`) or None; `reset()` keeps it."""
        return self._knowledge

    @knowledge.setter
    def knowledge(self, memory: KnowledgeMemory | None) -> None:
        if memory is not None:
            self._check_every_head_reads_memory()
            if not isinstance(memory, KnowledgeMemory):
                raise TypeError(f"knowledge must be a KnowledgeMemory or None, got {type(memory).__name__}")
            expected = {"kv_heads": self.kv_heads, "head_dim": self.head_dim,
                        "normalize": self.logits == "normalized", "model": self.fingerprint()}
            for field, value in expected.items():
                if getattr(memory, field) != value:
                    raise ValueError(f"this knowledge memory has {field}={getattr(memory, field)!r}, this patched model "
                                     f"needs {value!r}: it was memorised by another model or patch")
            if not set(memory.layers) <= set(self.layers):
                raise ValueError(f"this knowledge memory serves layers {memory.layers}, this model is patched at {self.layers}")
        self._knowledge = memory

    def _check_every_head_reads_memory(self) -> None:
        if any(plan is not None for plan in self.plans.values()):
            raise ValueError("knowledge memory needs memory in every query head of the memory layers: "
                             "patch without heads=")

    def fingerprint(self) -> str:
        """What knowledge depends on: the model (type, shape, a checksum of its embeddings), the
        weights of the memory layers' attention (the projections that make the stored keys and
        values, LoRA included) and where stored keys are placed; knowledge written under another
        fingerprint is refused."""
        modules = hf.attention_modules(self.model)
        attention = sum(float(p.detach().double().sum()) for i in self.layers
                        for name, p in modules[i].named_parameters() if name not in (GATE, SCALE))
        placement = (self.placement.policy, self.placement.distance) if self.placement else None
        return f"{hf.model_fingerprint(self.model)}/attention={attention:.9e}/placement={placement}"

    @torch.no_grad()
    def memorize(self, texts, tokenizer=None, *, storage: str | Storage = "fp16", window: int | None = None,
                 progress: bool = True) -> KnowledgeMemory:
        """Read reference texts into the knowledge memory (created on first use, with `storage`).

        texts: one item or a list; an item is a text (str), a file (os.PathLike, read as UTF-8) or
            token ids (a 1-D integer tensor or a list of ints). Strings and files need `tokenizer`.
        storage: "fp16", "sparse", "pq" or a `Storage` with options (`knnmem.knowledge`); it must match
            the existing knowledge memory's. window: tokens read at once (default: the model's
            context, at most 2048); each window of a text attends only to itself.
        Each text is read alone, with local attention only: the document memory is untouched. The
        texts' keys and values are held until the call ends: memorise a large corpus in several calls.
        """
        self._check_every_head_reads_memory()
        storage = Storage(storage) if isinstance(storage, str) else storage
        if not isinstance(storage, Storage):
            raise TypeError(f"storage must be one of {('fp16', 'sparse', 'pq')} or a Storage, got {storage!r}")
        storage.check(self.head_dim)
        if window is None:
            window = min(2048, getattr(self.model.config, "max_position_embeddings", None) or 2048)
        check_positive_int("window", window)
        if self._knowledge is not None and self._knowledge.storage != storage:
            raise ValueError(f"the knowledge memory stores {self._knowledge.storage}, not {storage}: "
                             "memorize with the same storage, or set handle.knowledge = None to start another")
        items = texts_to_ids(texts, tokenizer)
        device = next(self.model.parameters()).device
        knowledge = self._knowledge or KnowledgeMemory(self.layers, self.kv_heads, self.head_dim,
                                                       self.logits == "normalized", storage, self.fingerprint(), device)
        collected = []
        for ids in tqdm(items, desc="memorize", unit="text", disable=not progress):
            self._memorizing = Collector(self.layers, importance=storage.form == "sparse")
            try:
                for start in range(0, ids.numel(), window):
                    self.model(ids[None, start:start + window].to(device), use_cache=False)
                collected.append(self._memorizing.text())
            finally:
                self._memorizing = None
        knowledge.add(collected)  # all at once: PQ learns its codebooks from the first call's texts
        self._knowledge = knowledge
        return knowledge

    # ------------------------------------------------------------------ the attention step
    def _stored_heads(self, layer: int) -> int:
        plan = self.plans[layer]
        return self.kv_heads if plan is None else len(plan.kv)

    def _memory(self, layer: int, batch: int, device: torch.device) -> KNNMemory:
        settings = self.patch_settings
        self.memories[layer] = memory_for_batch(
            self.memories.get(layer), batch, "reset() on the memory handle", heads=self._stored_heads(layer),
            head_dim=self.head_dim, max_memories=settings.max_memories, backend=settings.memory_backend,
            pinned=settings.pinned, normalize=settings.logits == "normalized", device=device)
        return self.memories[layer]

    def attend(self, module: nn.Module, query, key, value, attention_mask, scaling, position_ids):
        """One memory layer's attention. query: (B, Hq, T, D); key, value: (B, Hkv, S, D), rotated,
        ending with the T new tokens; attention_mask: sdpa's bool mask or None -> (B, T, Hq, D)."""
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise TypeError("knnmem expects a boolean attention mask (sdpa's mask builder)")
        if self._memorizing is not None:  # memorize(): local attention only, keys go to knowledge
            return self._memorize_window(module, query, key, value, attention_mask, scaling, position_ids)
        if self.write_first is None and key.shape[2] > query.shape[2] and not self._warned_cache_write:
            self._warned_cache_write = True
            warnings.warn("a call with a KV cache (e.g. generate()) is writing its new tokens to knnmem memory, "
                          "which its cache also holds: the model will see them twice. Read with "
                          "`with model.knnmem.frozen():` (or `writing(first=n)`) to control what is written.",
                          stacklevel=2)
        plan = self.plans[module.layer_idx]
        if plan is None:
            out = self._attend_with_memory(module, query, key, value, attention_mask, scaling, position_ids)
            return out.transpose(1, 2).contiguous(), None
        device = query.device
        grouped, kv = plan.grouped.to(device), plan.kv.to(device)
        out = torch.empty_like(query)
        out[:, grouped] = self._attend_with_memory(module, query[:, grouped], key[:, kv], value[:, kv],
                                                   attention_mask, scaling, position_ids, plan)
        if plan.others.numel():
            out[:, plan.others.to(device)] = self._local_heads(module, query, key, value, attention_mask, scaling,
                                                               plan.others.to(device))
        return out.transpose(1, 2).contiguous(), None

    def _attend_with_memory(self, module, query, key, value, attention_mask, scaling, position_ids,
                            plan: HeadPlan | None = None) -> torch.Tensor:
        """Local + memory (+ knowledge) attention of the heads that read the store -> (B, Hq', T, D);
        then the write of the new tokens that leave the local context."""
        B, Hq, T, D = query.shape
        S = key.shape[2]
        layer, settings = module.layer_idx, self.patch_settings
        memory = self._memory(layer, B, query.device)
        knowledge = self._knowledge
        reads_knowledge = knowledge is not None and len(knowledge) > 0 and layer in knowledge.layers
        memory_q = query
        if self.placement is not None and (len(memory) or reads_knowledge):
            memory_q = self.placement.memory_query(query, position_ids, S)
        real = _real_tokens(attention_mask, B, T, S, query.device)
        if len(memory) and plan is None:
            indices = search_blocks(memory, memory_q.detach(), settings.topk, settings.query_block, real)
        elif len(memory):  # only the heads with memory search; the others of their groups retrieve nothing
            searched = plan.searched.to(query.device)
            found = search_blocks(memory, memory_q[:, searched].detach(), settings.topk, settings.query_block, real)
            indices = torch.full((B, Hq, T, found.shape[-1]), -1, dtype=torch.long, device=found.device)
            indices[:, searched] = found
        else:  # nothing to retrieve: no search
            indices = torch.full((B, Hq, T, 1), -1, dtype=torch.long, device=query.device)
        if len(memory) and settings.neighbours:
            indices = memory.with_neighbours(indices, settings.neighbours)
        self.last_indices[layer] = indices
        gate, memory_scale = getattr(module, GATE), getattr(module, SCALE)
        if plan is not None:
            gate, memory_scale = gate[plan.grouped.to(gate.device)], memory_scale[plan.grouped.to(gate.device)]
        extra = None
        if reads_knowledge:
            extra = knowledge.attend(layer, memory_q, settings.topk, settings.logits, scaling, memory_scale)
        out = knn_attention_core(query, key, value, memory.keys, memory.values, indices.to(query.device), gate,
                                 scaling, memory_scale, settings.mode, settings.logits, attention_mask, memory_q,
                                 extra, return_lse=False, memory_bias=settings.memory_bias)
        n = T if self.write_first is None else min(self.write_first, T)
        if n:
            new_k, new_v = key[:, :, S - T:], value[:, :, S - T:]
            store_k = new_k if self.placement is None else self.placement.stored_keys(new_k, position_ids, S)
            memory.add_unchecked(store_k[:, :, :n].detach(), new_v[:, :, :n].detach(),
                                 mask=real[:, :n])
        return out

    @staticmethod
    def _local_heads(module, query, key, value, attention_mask, scaling, heads: torch.Tensor) -> torch.Tensor:
        """transformers' own sdpa attention of the query `heads` that never read memory -> (B, h, T, D)."""
        from types import SimpleNamespace

        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        group = query.shape[1] // key.shape[1]
        kv = heads // group
        plain = SimpleNamespace(num_key_value_groups=1, is_causal=getattr(module, "is_causal", True), training=False)
        out, _ = sdpa_attention_forward(plain, query[:, heads], key[:, kv], value[:, kv], attention_mask,
                                        scaling=scaling)
        return out.transpose(1, 2)

    @torch.no_grad()
    def add_from_cache(self, cache, start: int, n: int) -> None:
        """Write tokens [start, start + n) of a transformers KV cache into every memory layer's store
        (the cached reader's eviction, `knnmem.stream.SlidingCache`). The cache's keys are rotated
        to their index in the cache."""
        for layer in self.layers:
            memory = self.memories.get(layer)
            if memory is None:
                raise RuntimeError(f"memory layer {layer} has not run: add_from_cache follows a forward pass")
            k = cache.layers[layer].keys[:, :, start:start + n]
            v = cache.layers[layer].values[:, :, start:start + n]
            plan = self.plans[layer]
            if plan is not None:
                k, v = k[:, plan.kv.to(k.device)], v[:, plan.kv.to(k.device)]
            if self.placement is not None:
                positions = torch.arange(start, start + n, device=k.device).expand(k.shape[0], n)
                k = self.placement.stored_keys(k, positions, start + n)
            memory.add_unchecked(k, v)

    def _memorize_window(self, module, query, key, value, attention_mask, scaling, position_ids):
        """memorize(): one window of one text, attended locally; its keys/values are collected."""
        if key.shape[2] != query.shape[2] or query.shape[0] != 1:
            raise RuntimeError("memorize reads one text at a time without a KV cache")
        store_k = key if self.placement is None else self.placement.stored_keys(key, position_ids, key.shape[2])
        self._memorizing.collect(module.layer_idx, query, key, store_k, value, scaling)
        out, _ = local_attention(query, key, value, scaling, attention_mask)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None


def search_blocks(memory: KNNMemory, queries: torch.Tensor, k: int, block: int,
                  real: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k slots (B, Hq, T, k') of `queries` (B, Hq, T, D), one search per `block` consecutive
    positions: by the sum of their queries (InfLLM's relevance of a memory to a chunk of queries,
    sum_q q.k), shared by the block; padding positions (`real` (B, T) False) add nothing.
    block 1: every query searches alone."""
    if block == 1:
        return memory.search_unchecked(queries, k)[1]
    B, H, T, D = queries.shape
    if real is not None:
        queries = queries * real[:, None, :, None].to(queries.dtype)
    padded = torch.nn.functional.pad(queries, (0, 0, 0, -T % block))  # zero queries add nothing to a sum
    pooled = padded.view(B, H, -1, block, D).sum(dim=3)
    return memory.search_unchecked(pooled, k)[1].repeat_interleave(block, dim=2)[:, :, :T]


def _real_tokens(attention_mask, B: int, T: int, S: int, device) -> torch.Tensor:
    """(B, T) bool: which of the T new tokens are real (a real token attends to itself)."""
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    t = torch.arange(T, device=device)
    return attention_mask.expand(B, -1, -1, -1)[:, 0, t, S - T + t]


def check_gate_init(gate_init: object) -> float:
    """A gate logit: any number but NaN (-inf closes the gate)."""
    if isinstance(gate_init, bool) or not isinstance(gate_init, (int, float)) or math.isnan(gate_init):
        raise ValueError(f"gate_init must be a number (-inf closes the gate), got {gate_init!r}")
    return float(gate_init)
