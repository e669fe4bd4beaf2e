"""Search backends of `KNNMemory`: exact top-k in torch, and FAISS flat / IVF / HNSW.

Every backend answers the same question: for queries `(B, H, N, D)` and a store whose row `b`
holds valid keys in slots `[0, count[b])` of `keys (B, H, M, D)`, return the top-k
`(scores, indices)` of shape `(B, H, N, k)`, where an index is a slot of the store (so it can be
read straight from the store's tensors) and `-1` (score `-inf`) marks an empty result.

Stateless backends (`exact`, `flat`) search the store's own tensors, so their indices can never
drift from the stored rows. Stateful ones (`ivf`, `hnsw`) keep one FAISS index per (row, head)
whose ids are the slots themselves, updated on every write (`on_write`) and clear (`on_clear`).

Trade-offs, for choosing a backend:
- `exact`: torch matmul + top-k, chunked over the memory, on the store's device. Exact; what
  `auto` picks on a GPU, for raw (un-normalised) keys, and on a CPU up to `AUTO_EXACT_MAX_CPU`
  (16384) memories per head.
- `flat`: FAISS brute force (`faiss.knn`) over the store's buffer. Exact; CPU, float32.
- `ivf`: FAISS IVF-Flat, up to `max_memories // 128` lists (at most 4096), `nprobe = 8`. A row is
  searched exactly until it holds 2048 keys, then trained on what it holds and retrained as it
  grows 4x. Supports deletion, so FIFO overwrites are cheap. What `auto` picks on a CPU for
  normalised keys above 16384 memories per head: exact search costs (queries x memories), IVF a
  small fraction (at 8K its recall on clustered keys is still low: 0.57).
- `hnsw`: FAISS HNSW-Flat (M=16, efSearch=32). Fast, high recall, but slow to build and it cannot
  delete: once a row's memory is full, every write that overwrites entries rebuilds that row's
  index from the buffer. Use it for memories that are written once and read many times.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch

from ._checks import check_choice, check_int

BACKENDS = ("exact", "flat", "ivf", "hnsw")

# Largest score block (queries x memory chunk) that the exact search materialises at once on a
# GPU; on a CPU, blocks of 64 queries x 16K memories (measured fastest on 2 cores: see README).
_EXACT_BLOCK_ELEMENTS = 1 << 25
_CPU_QUERY_BLOCK, _CPU_KEY_CHUNK = 64, 16384



def faiss_module():
    """FAISS, imported on first use: exact search (and a GPU machine without FAISS) needs none."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError("this search backend needs FAISS: pip install faiss-cpu (faiss-gpu-cu12 on a GPU); "
                          "backend='exact' needs none") from err
    return faiss

def _pad_topk(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (..., k') results to (..., k) with -inf / -1, and mark -inf scores as index -1."""
    missing = k - scores.shape[-1]
    if missing > 0:
        scores = torch.nn.functional.pad(scores, (0, missing), value=-math.inf)
        indices = torch.nn.functional.pad(indices, (0, missing), value=-1)
    indices = indices.masked_fill(torch.isneginf(scores), -1)
    return scores, indices


_TOPK_GROUP = 64  # scores per group in `_chunk_topk` (measured fastest on 2 cores: 64 of 32, 64, 128)


def _chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k (unsorted) along the last dim of scores (..., C), by groups of `_TOPK_GROUP`:
    the k groups with the largest maxima hold every one of the top k scores (a group without
    any of them has a smaller maximum than the k-th score), so only their k x 64 scores are
    ranked: a vectorised max over C and a top-k over C / 64 replace a top-k over C (on a 2-core CPU,
    exact search over 32K SmolLM2 keys per head took 15% less time), the same results (ties aside)."""
    C, G = scores.shape[-1], _TOPK_GROUP
    if C < 4 * k * G:
        return scores.topk(k, dim=-1, sorted=False)
    padded = torch.nn.functional.pad(scores, (0, -C % G), value=-math.inf)
    groups = padded.unflatten(-1, (-1, G)).amax(-1)  # (..., C / G)
    chosen = groups.topk(k, dim=-1, sorted=False).indices
    candidates = (chosen.unsqueeze(-1) * G + torch.arange(G, device=scores.device)).flatten(-2)  # (..., k G)
    top_s, keep = padded.gather(-1, candidates).topk(k, dim=-1, sorted=False)
    return top_s, candidates.gather(-1, keep)


def exact_search(
    keys: torch.Tensor, counts: torch.Tensor, queries: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k. keys: (B, H, M, D); counts: (B,); queries: (B, H, N, D).

    Scores are computed in blocks of queries x memory chunk and reduced to their top-k at once:
    on a CPU, blocks of 64 queries keep the scores in cache (twice as fast as one large block).
    """
    B, H, N, _ = queries.shape
    used = int(counts.max()) if counts.numel() else 0
    on_cpu = keys.device.type == "cpu"
    compute_dtype = torch.float32 if on_cpu else keys.dtype
    counts = counts.to(keys.device)
    query_block = _CPU_QUERY_BLOCK if on_cpu else N
    chunk = _CPU_KEY_CHUNK if on_cpu else max(1024, _EXACT_BLOCK_ELEMENTS // max(1, B * H * N))
    out_s = torch.full((B, H, N, min(k, used)), -math.inf, device=queries.device)
    out_i = torch.full((B, H, N, min(k, used)), -1, dtype=torch.long, device=queries.device)
    for q0 in range(0, N if used else 0, query_block):
        q = queries[:, :, q0:q0 + query_block].to(compute_dtype)
        best_s, best_i = None, None
        for start in range(0, used, chunk):
            stop = min(used, start + chunk)
            scores = (q @ keys[:, :, start:stop].to(compute_dtype).transpose(-1, -2)).float()
            if int(counts.min()) < stop:  # some row holds fewer keys than this chunk reaches
                invalid = torch.arange(start, stop, device=keys.device)[None, :] >= counts[:, None]  # (B, C)
                scores.masked_fill_(invalid[:, None, None, :], -math.inf)
            top_s, top_i = _chunk_topk(scores, min(k, stop - start))
            top_i += start
            if best_s is not None:
                top_s, top_i = torch.cat([best_s, top_s], dim=-1), torch.cat([best_i, top_i], dim=-1)
            best_s, keep = top_s.topk(min(k, top_s.shape[-1]), dim=-1)  # sorted, best first
            best_i = top_i.gather(-1, keep)
        out_s[:, :, q0:q0 + query_block], out_i[:, :, q0:q0 + query_block] = best_s, best_i
    return _pad_topk(out_s, out_i, k)


def _faiss_results(D: np.ndarray, I: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.from_numpy(D).float()
    indices = torch.from_numpy(I).long()
    scores = scores.masked_fill(indices < 0, -math.inf)
    return scores.to(device), indices.to(device)


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


class SearchBackend(ABC):
    """Base class. `memory` is the owning `KNNMemory` (keys, counts, max_memories, heads)."""

    name = ""

    def __init__(self, memory) -> None:
        self.memory = memory

    def on_write(self, row: int, slots: torch.Tensor, overwrote: bool) -> None:
        """Called after `slots` (1-D, in write order) of batch row `row` received new keys."""

    def on_clear(self, row: int) -> None:
        """Called after batch row `row` was emptied."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that `load_state` needs to restore the backend exactly (none if stateless)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from `state_tensors`. Stateless backends have nothing to restore."""

    @abstractmethod
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries: (B, H, N, D) -> (scores, indices), each (B, H, N, k)."""

    def describe(self) -> str:
        return self.name


class ExactBackend(SearchBackend):
    name = "exact"

    def search(self, queries, k):
        return exact_search(self.memory.keys, self.memory.counts, queries, k)


class FlatBackend(SearchBackend):
    """FAISS brute force over the store's own buffer: no second copy, no id bookkeeping."""

    name = "flat"

    def search(self, queries, k):
        faiss = faiss_module()
        mem = self.memory
        B, H, N, _ = queries.shape
        scores = torch.full((B, H, N, k), -math.inf, device=queries.device)
        indices = torch.full((B, H, N, k), -1, dtype=torch.long, device=queries.device)
        for b in range(B):
            count = int(mem.counts[b])
            if count == 0:
                continue
            for h in range(H):
                D, I = faiss.knn(
                    as_numpy(queries[b, h]), as_numpy(mem.keys[b, h, :count]), min(k, count),
                    metric=faiss.METRIC_INNER_PRODUCT,
                )
                s, i = _faiss_results(D, I, queries.device)
                scores[b, h, :, : s.shape[-1]] = s
                indices[b, h, :, : i.shape[-1]] = i
        return scores, indices


class _PerRowHeadIndexes(SearchBackend):
    """Shared bookkeeping of the stateful backends: one FAISS index per (row, head)."""

    def __init__(self, memory) -> None:
        super().__init__(memory)
        self.indexes: list[list[faiss.Index | None]] = [
            [None] * memory.heads for _ in range(memory.batch_size)
        ]

    def on_clear(self, row):
        self.indexes[row] = [None] * self.memory.heads

    def _search_row_head(self, index: faiss.Index, q: np.ndarray, k: int):
        return index.search(q, k)

    def state_tensors(self):
        faiss = faiss_module()
        # Approximate indexes are saved as built: rebuilding them would give other results.
        return {
            f"index.{b}.{h}": torch.from_numpy(faiss.serialize_index(index))
            for b, row in enumerate(self.indexes) for h, index in enumerate(row) if index is not None
        }

    index_type = "Index"  # the FAISS class a saved index must be

    def load_state(self, tensors):
        """Restore saved indexes, each verified against the buffer (a file is untrusted data)."""
        faiss = faiss_module()
        mem = self.memory
        for name, data in tensors.items():
            if not name.startswith("index."):
                continue
            parts = name.split(".")
            if len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
                raise ValueError(f"tensor {name!r} is not named index.<row>.<head>")
            b, h = int(parts[1]), int(parts[2])
            if not (b < mem.batch_size and h < mem.heads) or data.dtype != torch.uint8 or data.ndim != 1:
                raise ValueError(f"tensor {name!r} is not a serialised index of a row < {mem.batch_size} "
                                 f"and head < {mem.heads}")
            try:
                index = faiss.deserialize_index(data.numpy())
            except RuntimeError as err:
                raise ValueError(f"tensor {name!r} is not a readable FAISS index ({str(err).splitlines()[0]})") from None
            count = int(mem.counts[b])
            if (not isinstance(index, getattr(faiss, self.index_type)) or index.d != mem.head_dim
                    or index.metric_type != faiss.METRIC_INNER_PRODUCT):
                raise ValueError(f"tensor {name!r} must be an inner-product {self.index_type} "
                                 f"of dimension {mem.head_dim}")
            ids = self._ids(index)
            if len(ids) != count or (count and (ids.min() < 0 or ids.max() >= count or len(np.unique(ids)) != count)):
                raise ValueError(f"tensor {name!r}: its ids must be the row's {count} slots, each once")
            self.indexes[b][h] = index

    @staticmethod
    def _ids(index: faiss.Index) -> np.ndarray:
        """The ids an index holds (for verification on load)."""
        return np.arange(index.ntotal)

    def search(self, queries, k):
        mem = self.memory
        B, H, N, _ = queries.shape
        if all(index is None for row in self.indexes for index in row):
            return exact_search(mem.keys, mem.counts, queries, k)
        scores = torch.full((B, H, N, k), -math.inf, device=queries.device)
        indices = torch.full((B, H, N, k), -1, dtype=torch.long, device=queries.device)
        for b in range(B):
            for h in range(H):
                index = self.indexes[b][h]
                if index is None:  # not built yet for this row (e.g. IVF before training)
                    counts = mem.counts[b : b + 1]
                    s, i = exact_search(mem.keys[b : b + 1, h : h + 1], counts, queries[b : b + 1, h : h + 1], k)
                    scores[b, h], indices[b, h] = s[0, 0], i[0, 0]
                    continue
                D, I = self._search_row_head(index, as_numpy(queries[b, h]), k)
                scores[b, h], indices[b, h] = _faiss_results(D, I, queries.device)
        return scores, indices


class IVFBackend(_PerRowHeadIndexes):
    """IVF-Flat per (row, head), ids = slots. A row is searched exactly until it holds
    `min_train` keys; its index is then trained on the keys it holds, with `count // 39` lists
    (k-means needs ~39 points per list), and retrained each time the row has grown 4x, until it
    has `nlist` lists. Overwritten slots are removed and re-added (IVF can delete)."""

    name = "ivf"

    index_type = "IndexIVFFlat"

    def __init__(self, memory, nlist: int | None = None, nprobe: int = 8, min_train: int = 2048) -> None:
        super().__init__(memory)
        M = memory.max_memories
        self.nlist = _option("nlist", nlist, 1, 65536) if nlist is not None else max(1, min(4096, M // 128))
        self.nprobe = _option("nprobe", nprobe, 1, 65536)
        self.min_train = min(_option("min_train", min_train, 1, 1 << 40), M)
        self.trained_at = [0] * memory.batch_size  # the row's count when its index was trained

    def _build(self, row: int, h: int) -> faiss.Index:
        faiss = faiss_module()
        mem = self.memory
        count = int(mem.counts[row])
        data = as_numpy(mem.keys[row, h, :count])
        nlist = max(1, min(self.nlist, count // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(mem.head_dim), mem.head_dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # we choose nlist from the count ourselves; no warning
        index.train(data)
        index.add_with_ids(data, np.arange(count, dtype=np.int64))
        index.nprobe = min(self.nprobe, nlist)
        return index

    def on_clear(self, row):
        super().on_clear(row)
        self.trained_at[row] = 0

    def on_write(self, row, slots, overwrote):
        mem = self.memory
        count = int(mem.counts[row])
        index = self.indexes[row][0]
        grown = index is not None and index.nlist < self.nlist and count >= 4 * self.trained_at[row]
        if (index is None and count >= self.min_train) or grown:
            self.indexes[row] = [self._build(row, h) for h in range(mem.heads)]
            self.trained_at[row] = count
            return
        if index is None:
            return
        ids = slots.cpu().numpy().astype(np.int64)
        for h, index in enumerate(self.indexes[row]):
            if overwrote:
                index.remove_ids(ids)
            index.add_with_ids(as_numpy(mem.keys[row, h, slots.to(mem.keys.device)]), ids)

    @staticmethod
    def _ids(index):
        faiss = faiss_module()
        lists = index.invlists
        return np.concatenate([faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                               for i in range(index.nlist)] or [np.zeros(0, np.int64)])

    def load_state(self, tensors):
        super().load_state(tensors)
        for row, indexes in enumerate(self.indexes):
            self.trained_at[row] = int(self.memory.counts[row]) if indexes[0] is not None else 0

    def describe(self):
        return f"ivf(nlist={self.nlist}, nprobe={self.nprobe}, exact below {self.min_train} keys)"


class HNSWBackend(_PerRowHeadIndexes):
    """HNSW-Flat per (row, head). It cannot delete: a write that overwrites entries rebuilds
    the row's index from the buffer, in slot order, so that ids stay equal to slots."""

    name = "hnsw"

    index_type = "IndexHNSWFlat"

    def __init__(self, memory, m: int = 16, ef_search: int = 32) -> None:
        super().__init__(memory)
        self.m = _option("m", m, 2, 512)
        self.ef_search = _option("ef_search", ef_search, 1, 65536)

    def _new_index(self) -> faiss.Index:
        faiss = faiss_module()
        index = faiss.IndexHNSWFlat(self.memory.head_dim, self.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = self.ef_search
        return index

    def on_write(self, row, slots, overwrote):
        mem = self.memory
        if overwrote or self.indexes[row][0] is None:
            self.indexes[row] = [self._new_index() for _ in range(mem.heads)]
            slots = torch.arange(int(mem.counts[row]))
        for h, index in enumerate(self.indexes[row]):
            assert index.ntotal == int(slots[0]), "HNSW ids must equal slots"  # invariant
            index.add(as_numpy(mem.keys[row, h, slots.to(mem.keys.device)]))

    def _search_row_head(self, index, q, k):
        index.hnsw.efSearch = max(self.ef_search, k)
        return index.search(q, k)

    def describe(self):
        return f"hnsw(M={self.m}, efSearch={self.ef_search})"


def _option(name: str, value: object, lo: int, hi: int) -> int:
    return check_int(f"backend option {name}", value, lo, hi)


def make_backend(name: str, memory, **options) -> SearchBackend:
    classes = {"exact": ExactBackend, "flat": FlatBackend, "ivf": IVFBackend, "hnsw": HNSWBackend}
    check_choice("backend", name, ("auto",) + BACKENDS)
    allowed = {"ivf": ("nlist", "nprobe", "min_train"), "hnsw": ("m", "ef_search")}.get(name, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"backend_options {unknown} are not options of the {name!r} backend (it takes {list(allowed)})")
    if name != "exact":
        faiss_module()  # a missing FAISS fails when the memory is made, not at its first search
    return classes[name](memory, **options)


# Largest memory per (row, head) for which `auto` picks exact search on a CPU (see the README's
# store section and benchmarks/results/memory_cpu.json for the measured crossover).
AUTO_EXACT_MAX_CPU = 16384


def auto_backend(device: torch.device, max_memories: int, normalize: bool = True) -> str:
    """Exact search on a GPU, for small memories on a CPU, and for raw (un-normalised) keys, whose
    attention queries IVF ranks poorly (measured on SmolLM2: recall 0.7-0.9, top-1 score missed);
    IVF for larger normalised memories on a CPU (see the README's store section)."""
    if device.type != "cpu" or max_memories <= AUTO_EXACT_MAX_CPU or not normalize:
        return "exact"
    return "ivf"
