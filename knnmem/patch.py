"""Retrofit a pretrained Hugging Face causal LM with kNN memory layers, without copying its code.

`patch(model)` registers one attention function, "knnmem", in transformers' public
`AttentionInterface` (plus sdpa's mask builder under the same name: without a mask builder the
function would receive no padding mask), switches the model to it, and attaches a
`MemoryHandle` to the model. Unpatched layers run transformers' own sdpa function unchanged;
patched layers, on each forward call:

1. split the segment's rotated q/k into the memory query and un-rotated keys (`positions.py`),
2. retrieve the top-k memories of every query from the layer's `KNNMemory`,
3. attend locally and to memory through `knn_attention`,
4. write the segment's (un-rotated) keys and values into memory, skipping padding tokens.

A knowledge memory (`MemoryHandle.memorize`, `knnmem.knowledge`) is read at step 2-3 as well:
reference texts memorised once, kept across documents, shared by all batch rows.

Batch rows are separate documents. Memory state lives in the handle, one store per patched
layer, so `model.generate()` works unchanged.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .functional import (LOGITS, MODES, combine, knn_attention, local_allowed, local_attention, masked_softmax,
                         memory_attention)
from .knowledge import KnowledgeMemory, Storage
from ._checks import check_positive_int
from .memory import KNNMemory, atomic_write, check_memory_options, memory_for_batch
from .positions import POLICIES, RotaryPlacement

ATTENTION_NAME = "knnmem"
SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", "llama")
_GATE, _SCALE = "knn_gate", "knn_memory_scale"
_HANDLE_FORMAT = 2
DEFAULT_PINNED = 64  # first tokens of a document kept in a bounded memory (measured: README)
_LAYER_FILE = re.compile(r"layer_(\d+)\.[0-9a-f]{12}\.safetensors")
_PATCH_FILE = "knnmem_patch.safetensors"


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]


def _default_layers(n_layers: int) -> list[int]:
    """All layers: the training-free default (the paper's single trained layer sits at 75% depth,
    but without training memory in every layer gave the lowest perplexity; see the README)."""
    return list(range(n_layers))


class MemoryHandle:
    """The memory of a patched model: one `KNNMemory` per patched layer, created on first use."""

    def __init__(self, model: nn.Module, layers: list[int], topk: int, max_memories: int, mode: str,
                 logits: str, placement: RotaryPlacement | None, memory_backend: str, pinned: int,
                 previous_attn_implementation: str, kv_heads: int, head_dim: int, settings: dict) -> None:
        self.model, self.layers, self.kv_heads, self.head_dim = model, layers, kv_heads, head_dim
        self.settings = settings  # the keyword arguments of `patch` (saved by `save_patch`)
        self.topk, self.max_memories, self.mode, self.logits = topk, max_memories, mode, logits
        self.placement, self.memory_backend, self.pinned = placement, memory_backend, pinned
        self.previous_attn_implementation = previous_attn_implementation
        self.memories: dict[int, KNNMemory] = {}
        self.last_indices: dict[int, torch.Tensor] = {}  # layer -> (B, Hq, T, topk) of the last call
        self.write_first: int | None = None  # None: every call writes all its new tokens
        self.training: dict | None = None  # what knnmem.train.prepare made trainable (saved with it)
        self._knowledge: KnowledgeMemory | None = None
        self._memorizing: _Collecting | None = None  # what memorize() collects of a text

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
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise ValueError(f"first must be a non-negative integer, got {first!r}")
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
        return {
            "layers": self.layers, "topk": self.topk, "mode": self.mode, "logits": self.logits,
            "position": self.placement.policy if self.placement else None,
            "distance": self.placement.distance if self.placement else None,
            "stored_per_row": {i: m.counts.tolist() for i, m in sorted(self.memories.items())},
            "backend": {i: m.backend for i, m in sorted(self.memories.items())},
            "bytes": sum(m.keys.nbytes + m.values.nbytes for m in self.memories.values()),
            "knowledge": repr(self._knowledge) if self._knowledge is not None else None,
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write every layer's memory into `directory` as one snapshot: layer files named by a fresh
        snapshot id, then `handle.json` naming them (written atomically, last). An interrupted save
        leaves the previous snapshot loadable; older snapshots' files are removed after."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        snapshot = uuid.uuid4().hex[:12]
        files = {}
        for i, memory in sorted(self.memories.items()):
            files[str(i)] = f"layer_{i}.{snapshot}.safetensors"
            memory.save(os.path.join(directory, files[str(i)]))
        meta = {"format_version": _HANDLE_FORMAT, "layers": self.layers, "files": files}
        atomic_write(os.path.join(directory, "handle.json"), lambda tmp: _write_json(tmp, meta))
        for name in os.listdir(directory):
            if _LAYER_FILE.fullmatch(name) and name not in files.values():
                os.remove(os.path.join(directory, name))

    def load(self, directory: str | os.PathLike) -> None:
        """Read a snapshot written by `save`. Everything is checked (names stay inside `directory`,
        each memory matches this handle's layers, heads, head_dim, capacity and logits) before
        the current memories are replaced; any problem raises ValueError."""
        directory = os.fspath(directory)
        path = os.path.join(directory, "handle.json")
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a readable knnmem handle file: {err}") from err
        if not isinstance(meta, dict) or meta.get("format_version") != _HANDLE_FORMAT:
            raise ValueError(f"{path}: not a knnmem handle file of format {_HANDLE_FORMAT}")
        if meta.get("layers") != self.layers:
            raise ValueError(f"{path} holds memories of layers {meta.get('layers')}, this model is patched at {self.layers}")
        files = meta.get("files")
        if not isinstance(files, dict):
            raise ValueError(f"{path}: field 'files' must map layer indices to file names")
        device = next(self.model.parameters()).device
        memories = {}
        for layer, name in files.items():
            match = _LAYER_FILE.fullmatch(name) if isinstance(name, str) else None
            if match is None or match.group(1) != layer or int(layer) not in self.layers:
                raise ValueError(f"{path}: entry {layer!r}: {name!r} is not a memory file of a patched layer "
                                 "(layer_<i>.<snapshot>.safetensors, in this folder)")
            memory = KNNMemory.load(os.path.join(directory, name), device=device)
            expected = {"heads": self.kv_heads, "head_dim": self.head_dim, "max_memories": self.max_memories,
                        "pinned": self.pinned, "normalize": self.logits == "normalized"}
            for field, value in expected.items():
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

    def fingerprint(self) -> str:
        """What knowledge depends on: the model (type, shape, a checksum of its embeddings) and where
        stored keys are placed; knowledge written under another fingerprint is refused."""
        config, weight = self.model.config, self.model.get_input_embeddings().weight
        checksum = float(weight.detach().flatten()[:65536].double().sum())
        placement = (self.placement.policy, self.placement.distance) if self.placement else None
        return (f"{config.model_type}/{config.num_hidden_layers}x{config.hidden_size}/{checksum:.9e}/"
                f"placement={placement}")

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
        items = [token_ids(item, tokenizer) for item in ([texts] if isinstance(texts, (str, os.PathLike, torch.Tensor))
                                                         or _is_id_list(texts) else list(texts))]
        if not items:
            raise ValueError("memorize got no texts")
        device = next(self.model.parameters()).device
        knowledge = self._knowledge or KnowledgeMemory(self.layers, self.kv_heads, self.head_dim,
                                                       self.logits == "normalized", storage, self.fingerprint(), device)
        from tqdm import tqdm

        collected = []
        for ids in tqdm(items, desc="memorize", unit="text", disable=not progress):
            self._memorizing = _Collecting(storage.form == "sparse", {layer: [] for layer in self.layers})
            try:
                for start in range(0, ids.numel(), window):
                    self.model(ids[None, start:start + window].to(device), use_cache=False)
                if any(not pieces for pieces in self._memorizing.parts.values()):
                    raise RuntimeError("memorize: not every memory layer ran (is this the patched model?)")
                collected.append({layer: tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))
                              for layer, pieces in self._memorizing.parts.items()})
            finally:
                self._memorizing = None
        knowledge.add(collected)  # all at once: PQ learns its codebooks from the first call's texts
        self._knowledge = knowledge
        return knowledge

    def _collect(self, layer: int, query, key, store_k, value, scaling: float) -> None:
        """memorize(): keep a window's keys/values of `layer` and the attention each key received
        (summed over the queries of its KV head's group)."""
        H, T = key.shape[1], key.shape[2]
        received = torch.zeros(H, T, device=key.device)
        if self._memorizing.importance:  # only the sparse form needs it
            group = query.shape[1] // H
            logits = (query[0].float() @ key[0].float().repeat_interleave(group, dim=0).transpose(-1, -2)) * scaling
            probs, _ = masked_softmax(logits, local_allowed(T, T, None, key.device)[0])  # causal
            received = probs.sum(dim=1).reshape(H, group, T).sum(dim=1)
        self._memorizing.parts[layer].append((store_k[0].detach().float(), value[0].detach().float(), received))

    # ------------------------------------------------------------------ the attention step
    def _memory(self, layer: int, batch: int, heads: int, head_dim: int, device: torch.device) -> KNNMemory:
        self.memories[layer] = memory_for_batch(
            self.memories.get(layer), batch, "reset() on the memory handle", heads=heads, head_dim=head_dim,
            max_memories=self.max_memories, backend=self.memory_backend, pinned=self.pinned,
            normalize=self.logits == "normalized", device=device)
        return self.memories[layer]

    def attend(self, module: nn.Module, query, key, value, attention_mask, scaling, position_ids):
        B, Hq, T, D = query.shape
        S = key.shape[2]
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise TypeError("knnmem expects a boolean attention mask (sdpa's mask builder)")
        new_k, new_v = key[:, :, S - T:], value[:, :, S - T:]
        if attention_mask is None:
            real = torch.ones(B, T, dtype=torch.bool, device=query.device)
        else:  # a real token attends to itself; padding attends to nothing
            t = torch.arange(T, device=query.device)
            real = attention_mask.expand(B, -1, -1, -1)[:, 0, t, S - T + t]
        if self._memorizing is not None:  # memorize(): local attention only, keys go to knowledge
            if T != S or B != 1:
                raise RuntimeError("memorize reads one text at a time without a KV cache")
            store_k = key if self.placement is None else self.placement.stored_keys(key, position_ids, S)
            self._collect(module.layer_idx, query, key, store_k, value, scaling)
            out, _ = local_attention(query, key, value, scaling, attention_mask)
            return out.to(query.dtype).transpose(1, 2).contiguous(), None
        memory = self._memory(module.layer_idx, B, key.shape[1], D, query.device)
        knowledge = self._knowledge
        reads_knowledge = knowledge is not None and len(knowledge) > 0 and module.layer_idx in knowledge.layers
        memory_q = query
        if self.placement is not None and (len(memory) or reads_knowledge):
            memory_q = self.placement.memory_query(query, position_ids, S)
        if len(memory):
            _, indices = memory.search(memory_q.detach(), self.topk)
        else:  # nothing to retrieve: no search
            indices = torch.full((B, Hq, T, self.topk), -1, dtype=torch.long, device=query.device)
        self.last_indices[module.layer_idx] = indices
        gate, memory_scale = getattr(module, _GATE), getattr(module, _SCALE)
        if reads_knowledge:
            known = knowledge.attend(module.layer_idx, memory_q, self.topk, self.logits, scaling, memory_scale)
            out = self._attend_with_knowledge(query, key, value, memory, indices, memory_q, known, gate,
                                              memory_scale, scaling, attention_mask)
        else:
            out = knn_attention(
                query, key, value, memory.keys, memory.values, indices.to(query.device), gate, scale=scaling,
                memory_scale=memory_scale, mode=self.mode, logits=self.logits, attention_mask=attention_mask,
                memory_q=memory_q,
            )
        n = T if self.write_first is None else min(self.write_first, T)
        if n:
            store_k = new_k if self.placement is None else self.placement.stored_keys(new_k, position_ids, S)
            memory.add(store_k[:, :, :n].detach(), new_v[:, :, :n].detach(), mask=real[:, :n])
        return out.transpose(1, 2).contiguous(), None


    def _attend_with_knowledge(self, query, key, value, memory, indices, memory_q, known, gate, memory_scale,
                               scaling, attention_mask):
        """Attention over the local window, the document's memories and the knowledge memory's.
        joint: one softmax over all three (the two memory branches through their lse).
        gate: the memory branch is one softmax over both memories' retrievals, gated against local."""
        known_out, known_lse = known
        if self.mode == "joint":
            out, local_lse, memory_lse = knn_attention(
                query, key, value, memory.keys, memory.values, indices.to(query.device), scale=scaling,
                memory_scale=memory_scale, mode="joint", logits=self.logits, attention_mask=attention_mask,
                memory_q=memory_q, return_lse=True)
            both = torch.logaddexp(local_lse, memory_lse)
            return combine(out.float(), both, known_out.float(), known_lse.float(), "joint", None).to(query.dtype)
        compute = torch.promote_types(query.dtype, torch.float32)
        local_out, _ = local_attention(query.to(compute), key.to(compute), value.to(compute), scaling, attention_mask)
        doc_out, doc_lse = memory_attention(memory_q.to(compute), memory.keys, memory.values, indices.long(),
                                            self.logits, scaling, memory_scale)
        memory_out = combine(doc_out, doc_lse, known_out.to(compute), known_lse.to(compute), "joint", None)
        memory_lse = torch.logaddexp(doc_lse, known_lse.to(compute))
        return combine(local_out, None, memory_out, memory_lse, "gate", gate).to(query.dtype)


@dataclass
class _Collecting:
    """What `memorize` collects while a text is read: per layer, a (keys, values, importance) per window."""

    importance: bool  # also the attention each key received (the sparse form selects by it)
    parts: dict[int, list]


def token_ids(item, tokenizer) -> torch.Tensor:
    """One text for memorize: str (tokenised), os.PathLike (a UTF-8 file, tokenised), a 1-D integer
    tensor or a list of ints -> a 1-D int64 tensor of at least one token."""
    if isinstance(item, os.PathLike):
        with open(item, encoding="utf-8") as f:
            item = f.read()
    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError("memorize needs a tokenizer for texts and files (or give token ids)")
        ids = torch.tensor(tokenizer(item, add_special_tokens=False).input_ids, dtype=torch.long)
    elif isinstance(item, torch.Tensor) and item.ndim == 1 and not item.is_floating_point() and item.dtype != torch.bool:
        ids = item.long()
    elif _is_id_list(item):
        ids = torch.tensor(item, dtype=torch.long)
    else:
        raise TypeError(f"memorize takes texts (str), files (os.PathLike) or token ids (1-D integer tensor or list "
                        f"of ints), got {type(item).__name__}")
    if ids.numel() == 0:
        raise ValueError("memorize got an empty text")
    return ids


def _is_id_list(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def _knnmem_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      position_ids=None, **kwargs):
    """The registered attention function: memory layers through the handle, others through sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    handle: MemoryHandle | None = getattr(module, "_knnmem_handle", None)
    if handle is None or module.layer_idx not in handle.layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return handle.attend(module, query, key, value, attention_mask, scaling, position_ids)


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _knnmem_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def patch(
    model: nn.Module,
    layers: Iterable[int] | None = None,
    topk: int = 32,
    max_memories: int = 65536,
    mode: str = "joint",
    logits: str = "raw",
    position: str = "constant",
    distance: int = 512,
    memory_backend: str = "auto",
    gate_init: float = 0.0,
    pinned: int | None = None,
) -> MemoryHandle:
    """Turn attention layers of a transformers causal LM (GPT-2, GPT-NeoX/Pythia, Llama family)
    into kNN memory layers. Returns the `MemoryHandle` (also at `model.knnmem`).

    Args:
        layers: indices of the layers to patch; None = all layers (the measured best for a
            training-free retrofit).
        topk: memories retrieved per query and head. max_memories: capacity per (row, KV head).
        mode: "joint" (one softmax over memory and local keys: training-free) or "gate".
        logits: "raw" (the model's own q.k scale: training-free) or "normalized" (cosine times a
            learned per-head scale, the paper's form; needs fine-tuning).
        position: where memory keys sit for rotary models: "constant", "start" or "none"
            (`knnmem.positions`). distance: the distance of the "constant" policy.
        memory_backend: search backend of the stores ("auto", "exact", "ivf", ...).
        gate_init: initial gate logit of mode="gate" (0 = sigmoid 0.5, as in the paper's code).
        pinned: the first `pinned` tokens of each document stay in memory when it overflows (the
            model's attention sinks: without them a bounded memory is worse than none, see the
            README). None: 64, or max_memories // 2 if that is smaller.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"knnmem.patch supports transformers models of types {SUPPORTED_MODEL_TYPES} "
                        f"(GPT-2, GPT-NeoX/Pythia, Llama family), got {type(model).__name__} "
                        f"(model_type={model_type!r})")
    if getattr(model, "knnmem", None) is not None:
        raise ValueError("this model is already patched: call knnmem.unpatch(model) first")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
    if position not in POLICIES:
        raise ValueError(f"position must be one of {POLICIES}, got {position!r}")
    check_positive_int("topk", topk)
    check_positive_int("max_memories", max_memories)
    if pinned is None:
        pinned = min(DEFAULT_PINNED, max_memories // 2)
    check_memory_options(max_memories, memory_backend, pinned)
    if isinstance(distance, bool) or not isinstance(distance, int) or distance < 0:
        raise ValueError(f"distance must be a non-negative integer, got {distance!r}")
    if isinstance(gate_init, bool) or not isinstance(gate_init, (int, float)) or math.isnan(gate_init):
        raise ValueError(f"gate_init must be a number (-inf closes the gate), got {gate_init!r}")
    modules = _attention_modules(model)
    n_layers = len(modules)
    if layers is not None:
        layers = list(layers)
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers]
        if bad or not layers:
            raise ValueError(f"layers must be a non-empty list of layer indices in [0, {n_layers}), got {layers}")
    layers = _default_layers(n_layers) if layers is None else sorted(set(layers))
    rotary = getattr(model.base_model, "rotary_emb", None)
    placement = RotaryPlacement(rotary, position, distance) if rotary is not None else None
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(modules[0], "head_dim", config.hidden_size // heads)  # GPT-NeoX has none
    settings = dict(layers=layers, topk=topk, max_memories=max_memories, mode=mode, logits=logits,
                    position=position, distance=distance, memory_backend=memory_backend, pinned=pinned)
    handle = MemoryHandle(model, layers, topk, max_memories, mode, logits, placement, memory_backend, pinned,
                          model.config._attn_implementation, getattr(config, "num_key_value_heads", None) or heads,
                          head_dim, settings)
    for module in modules:
        if module.layer_idx in layers:
            param = next(module.parameters())
            module.register_parameter(_GATE, nn.Parameter(torch.full((heads,), float(gate_init), device=param.device)))
            module.register_parameter(_SCALE, nn.Parameter(torch.full((heads,), head_dim**0.5, device=param.device)))
        module._knnmem_handle = handle
    _register()
    model.set_attn_implementation(ATTENTION_NAME)
    model.knnmem = handle
    return handle


def unpatch(model: nn.Module) -> None:
    """Restore the model exactly as it was before `patch` (parameters, attention function)."""
    handle: MemoryHandle | None = getattr(model, "knnmem", None)
    if handle is None:
        raise ValueError("this model is not patched by knnmem")
    for module in _attention_modules(model):
        for name in (_GATE, _SCALE):
            if name in module._parameters:
                del module._parameters[name]
        del module._knnmem_handle
    model.set_attn_implementation(handle.previous_attn_implementation)
    del model.knnmem


def memory_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that patching added (gates and memory scales), e.g. for fine-tuning."""
    return [p for m in _attention_modules(model) for n, p in m.named_parameters(recurse=False)
            if n in (_GATE, _SCALE)]


def save_patch(model: nn.Module, directory: str | os.PathLike) -> None:
    """Save what `patch` added to `model` (its settings, and the gates and memory scales, e.g. after
    fine-tuning) to `directory`/knnmem_patch.safetensors, beside `model.save_pretrained(directory)`.
    `load_patch` restores it onto a freshly loaded model."""
    handle: MemoryHandle | None = getattr(model, "knnmem", None)
    if handle is None:
        raise ValueError("this model is not patched by knnmem")
    tensors = {f"layer.{m.layer_idx}.{name}": getattr(m, name).detach().cpu().contiguous()
               for m in _attention_modules(model) if m.layer_idx in handle.layers for name in (_GATE, _SCALE)}
    os.makedirs(directory, exist_ok=True)
    from safetensors.torch import save_file

    atomic_write(os.path.join(directory, _PATCH_FILE),
                 lambda tmp: save_file(tensors, tmp, metadata={"knnmem_patch": json.dumps(handle.settings)}))


def read_tensors_and_json(path: str, key: str, kind: str) -> tuple[dict[str, torch.Tensor], object]:
    """(tensors, the JSON metadata stored under `key`) of a safetensors file; ValueError naming
    the file as a `kind` if it cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(key, "null"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable {kind}: {err}") from err
    return tensors, meta


def patch_with_settings(model: nn.Module, settings: object, path: str) -> MemoryHandle:
    """`patch(model, **settings)` for settings read from the file at `path` (`MemoryHandle.settings`),
    after checking they are keyword arguments of `patch`."""
    allowed = set(inspect.signature(patch).parameters) - {"model", "gate_init"}
    if not isinstance(settings, dict) or not set(settings) <= allowed:
        raise ValueError(f"{path}: settings must be keyword arguments of knnmem.patch, got {settings!r}")
    return patch(model, **settings)


def load_patch(model: nn.Module, directory: str | os.PathLike) -> MemoryHandle:
    """Patch `model` with the settings saved by `save_patch` and restore its trained gates and
    memory scales. Returns the handle (memories start empty)."""
    path = os.path.join(directory, _PATCH_FILE)
    tensors, settings = read_tensors_and_json(path, "knnmem_patch", "knnmem patch file")
    handle = patch_with_settings(model, settings, path)
    expected = {f"layer.{m.layer_idx}.{name}": getattr(m, name)
                for m in _attention_modules(model) if m.layer_idx in handle.layers for name in (_GATE, _SCALE)}
    if set(tensors) != set(expected) or any(tensors[k].shape != p.shape for k, p in expected.items()):
        unpatch(model)
        raise ValueError(f"{path}: parameters {sorted(tensors)} do not match this model's patched layers")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])
    return handle
