"""`KNNMemory`: a bounded per-(batch row, KV head) memory of keys and values, with kNN search.

Storage is a ring buffer: `keys`, `values` of shape `(B, H, A, D)`, where the allocated slots A grow
with what is written (doubling, from 256, up to the capacity M): a store sized for 65,536 memories
that holds 8 tokens takes 256 slots, not 65,536. Row `b`'s n-th written token
goes to slot `n` while the row has room; after that the oldest entries are overwritten first
(FIFO), except the row's first `pinned` tokens (a document's attention sinks), which stay until
the row is cleared. The valid slots of a row are always `[0, counts[b])`. Search results are slots, so an attention
kernel reads `keys[b, h, idx]` directly, and ids can never drift from the stored rows.

Rows are separate documents and heads separate memories: nothing is ever searched across them.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_dim, check_finite, check_floating, check_int, check_positive_int, check_tensor
from .files import check_metadata_fields, read_tensors_and_json, save_tensors_and_json
from .rows import check_indices, gather_rows
from .search import AUTO_EXACT_MAX_CPU, BACKENDS, auto_backend, make_backend

_FORMAT_VERSION = 2
_FIRST_ALLOCATION = 256  # slots per (row, head) allocated by the first write


class KNNMemory:
    """Per-row, per-head kNN memory.

    Args:
        batch_size: number of independent rows (documents streamed side by side), B.
        heads: number of key/value heads, H. Queries may have any multiple of H heads (GQA).
        head_dim: D.
        max_memories: capacity per (row, head), M; the oldest entries are overwritten first.
        pinned: the first `pinned` tokens written to a row after a clear are never overwritten
            (0 <= pinned < M); FIFO applies to the other M - pinned slots.
        backend: "auto" (default), "exact", "flat", "ivf" or "hnsw"; see `knnmem.search`.
            The resolved choice is `memory.backend`. `auto` decides by what is stored: exact search,
            and on a CPU for normalised keys of a capacity above 16384, IVF once a row holds 16384
            keys (searched exactly until then).
        normalize: L2-normalise keys on write and queries on search (the paper's form).
            False keeps raw keys and searches by raw inner product (training-free retrofits).
        device: where the buffers live (default: CPU).
        dtype: buffer dtype (default: float16 on CUDA, float32 on CPU, where fp16 math is slow).
        backend_options: keyword options of the backend (ivf: nlist, nprobe; hnsw: m, ef_search).
    """

    def __init__(
        self,
        batch_size: int,
        heads: int,
        head_dim: int,
        max_memories: int = 65536,
        *,
        backend: str = "auto",
        pinned: int = 0,
        normalize: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend_options: dict | None = None,
    ) -> None:
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.heads = check_positive_int("heads", heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        check_memory_options(max_memories, backend, pinned)
        self.max_memories, self.pinned = max_memories, pinned
        device = torch.device(device if device is not None else "cpu")
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.normalize = bool(normalize)
        shape = (batch_size, heads, 0, head_dim)  # slots are allocated as they are written (`_reserve`)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        # Tokens ever written per row since its last clear (on CPU: it drives Python control flow).
        self.written = torch.zeros(batch_size, dtype=torch.long)
        name = auto_backend(device, max_memories, self.normalize) if backend == "auto" else backend
        self._backend_options = dict(backend_options or {})
        if backend == "auto" and name == "ivf":  # by what is stored: exact until a row holds the crossover
            self._backend_options.setdefault("min_train", AUTO_EXACT_MAX_CPU)
        self._search = make_backend(name, self, **self._backend_options)

    def _reserve(self, slots: int) -> None:
        """Allocate at least `slots` slots per (row, head) (at most M), keeping what is stored."""
        allocated = self.keys.shape[2]
        if slots <= allocated:
            return
        size = min(self.max_memories, max(slots, 2 * allocated, _FIRST_ALLOCATION))
        B, H, _, D = self.keys.shape
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.zeros(B, H, size, D, device=old.device, dtype=old.dtype)
            new[:, :, :allocated] = old
            setattr(self, name, new)

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        """The resolved search backend, e.g. "exact" or "ivf(nlist=256, nprobe=64)"."""
        return self._search.describe()

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def counts(self) -> torch.Tensor:
        """Valid entries per row, (B,): valid slots of row b are [0, counts[b])."""
        return self.written.clamp(max=self.max_memories)

    def __len__(self) -> int:
        return int(self.counts.sum())

    def __repr__(self) -> str:
        return (
            f"KNNMemory(batch_size={self.batch_size}, heads={self.heads}, head_dim={self.head_dim}, "
            f"max_memories={self.max_memories}, pinned={self.pinned}, backend={self.backend!r}, normalize={self.normalize}, "
            f"device={self.device}, dtype={self.dtype}, stored={self.counts.tolist()})"
        )

    # ------------------------------------------------------------------ writing
    def _check_kv(self, name: str, x: torch.Tensor) -> None:
        doc = f"(B={self.batch_size}, H={self.heads}, T, D={self.head_dim})"
        check_tensor(name, x, 4, doc)
        check_floating(name, x)
        check_dim(name, x, 0, self.batch_size, doc)
        check_dim(name, x, 1, self.heads, doc)
        check_dim(name, x, 3, self.head_dim, doc)
        check_finite(name, x)

    @torch.no_grad()
    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Append tokens to memory (detached).

        keys, values: (B, H, T, D). mask: optional (B, T) bool, True = store this token
        (padding must be False: it is never stored). Tokens are written in order; a row that
        receives more than M tokens keeps its first `pinned` and its last M - `pinned`.
        """
        self._check_kv("keys", keys)
        self._check_kv("values", values)
        if values.shape != keys.shape:
            raise ValueError(f"values must have the shape of keys {tuple(keys.shape)}, got {tuple(values.shape)}")
        T = keys.shape[2]
        if mask is not None:
            check_tensor("mask", mask, 2, f"(B={self.batch_size}, T={T})")
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor of shape (B, T), got dtype {mask.dtype}")
            if tuple(mask.shape) != (self.batch_size, T):
                raise ValueError(f"mask must have shape (B={self.batch_size}, T={T}), got {tuple(mask.shape)}")
        self.add_unchecked(keys, values, mask)

    @torch.no_grad()
    def add_unchecked(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """`add` for arguments already checked (finite, of this store's shape): the retrofit's write."""
        T = keys.shape[2]
        if self.normalize:
            keys = F.normalize(keys.float(), dim=-1)
        keys = keys.to(self.device, self.dtype)
        values = values.to(self.device, self.dtype)
        for name, x in (("keys", keys), ("values", values)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} hold finite values beyond the range of the store's dtype {self.dtype}: "
                                 "scale them down or use a float32 store (dtype=torch.float32)")
        M, P = self.max_memories, self.pinned
        new = torch.full((self.batch_size,), T) if mask is None else mask.sum(dim=1).cpu()
        self._reserve(min(M, int((self.written + new).max())))
        for row in range(self.batch_size):
            tokens = torch.arange(T) if mask is None else mask[row].nonzero().flatten().cpu()
            n = tokens.numel()
            if n == 0:
                continue
            ordinal = int(self.written[row]) + torch.arange(n)  # n-th token of the row since its clear
            # Skip tokens that a later token of this very write overwrites (same slot, M - P on).
            keep = (ordinal < P) | (ordinal + (M - P) > ordinal[-1])
            tokens, ordinal = tokens[keep], ordinal[keep]
            slots = torch.where(ordinal < M, ordinal, P + (ordinal - P) % (M - P))
            overwrote = int(self.written[row]) + n > M
            dev_slots, dev_tokens = slots.to(self.device), tokens.to(self.device)
            self.keys[row, :, dev_slots] = keys[row][:, dev_tokens]
            self.values[row, :, dev_slots] = values[row][:, dev_tokens]
            self.written[row] += n
            self._search.on_write(row, slots, overwrote)

    def clear(self, rows: int | list[int] | torch.Tensor | None = None) -> None:
        """Empty all rows, or the given batch rows (a new document starts in each).

        rows: None (all), an int, a list/tuple of ints, a 1-D integer tensor, or a (B,) bool mask.
        Every row is checked before any is cleared.
        """
        for row in parse_rows(rows, self.batch_size):
            self.written[row] = 0
            self._search.on_clear(row)

    # ------------------------------------------------------------------ reading
    def _check_queries(self, queries: torch.Tensor) -> int:
        doc = f"(B={self.batch_size}, Hq, T, D={self.head_dim}) with Hq a multiple of H={self.heads}"
        check_tensor("queries", queries, 4, doc)
        check_floating("queries", queries)
        check_dim("queries", queries, 0, self.batch_size, doc)
        check_dim("queries", queries, 3, self.head_dim, doc)
        if queries.shape[1] % self.heads:
            raise ValueError(f"queries must have shape {doc}, got {tuple(queries.shape)}")
        check_finite("queries", queries)
        return queries.shape[1] // self.heads

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k memories of each query, within its own row and KV head.

        queries: (B, Hq, T, D); query head j searches KV head j // (Hq // H), as in
        grouped-query attention. Returns (scores float32, indices int64), each (B, Hq, T, k') with
        k' = min(k, the most memories any row holds) (at least 1: results are never padded beyond
        what is stored): indices are slots of `keys`/`values`, -1 (score -inf) where a row holds
        fewer than k' memories.
        """
        self._check_queries(queries)
        return self.search_unchecked(queries, check_positive_int("k", k))

    @torch.no_grad()
    def search_unchecked(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`search` for arguments already checked (finite queries of this store's shape, k > 0)."""
        B, Hq, T, D = queries.shape
        group = Hq // self.heads
        k = min(k, max(1, int(self.counts.max())))
        if self.normalize:
            queries = F.normalize(queries.float(), dim=-1)
        grouped = queries.to(self.device).reshape(B, self.heads, group * T, D)
        scores, indices = self._search.search(grouped, k)
        return scores.reshape(B, Hq, T, k), indices.reshape(B, Hq, T, k)

    def ordinals(self, slots: torch.Tensor) -> torch.Tensor:
        """Which token of its row's document (0 = the first since the row's clear) each slot holds.
        slots: (B, ...) valid slot indices -> (B, ...) int64."""
        M, P = self.max_memories, self.pinned
        written = self.written.to(slots.device).view(-1, *([1] * (slots.dim() - 1)))
        newest = P + (written - 1 - P).clamp(min=0) % (M - P)  # slot of the last FIFO token, once wrapped
        return torch.where((written > M) & (slots >= P), written - 1 - (newest - slots) % (M - P), slots)

    def with_neighbours(self, indices: torch.Tensor, n: int) -> torch.Tensor:
        """Each found slot with the stored tokens up to `n` before and after it in its document.

        indices: (B, Hq, T, k) slots (-1 = empty) -> (B, Hq, T, k * (2n + 1)) slots, each at most once
        per query (in slot order), -1 elsewhere. Neighbours are by position in the document, not by
        slot: across the ring's wrap, and between the pinned tokens and the FIFO part, a token
        whose neighbour was overwritten has none on that side.
        """
        n = check_int("n", n, 0)
        if n == 0:
            return indices
        M, P = self.max_memories, self.pinned
        written = self.written.to(indices.device).view(-1, 1, 1, 1)
        ordinal = self.ordinals(indices.clamp(min=0))
        near = ordinal.unsqueeze(-1) + torch.arange(-n, n + 1, device=indices.device)  # (B, Hq, T, k, 2n+1)
        written = written.unsqueeze(-1)
        stored = (near >= 0) & (near < written) & ((near < P) | (near >= written - (M - P)))
        stored &= (indices >= 0).unsqueeze(-1)
        near = torch.where(near < P, near, P + (near - P) % (M - P))
        near = torch.where(stored, near, -1).flatten(-2).sort(dim=-1).values
        repeated = torch.zeros_like(near, dtype=torch.bool)
        repeated[..., 1:] = near[..., 1:] == near[..., :-1]
        return near.masked_fill(repeated, -1)

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored (keys, values) at `indices` (B, Hq, T, k) -> two (B, Hq, T, k, D) tensors.

        Empty slots (-1) read as zeros. Attention code that can read rows by index (the Triton
        kernel) uses `keys`/`values` directly instead of this copy.
        """
        check_indices(indices, self.keys.shape[2])
        group = indices.shape[1] // self.heads
        return gather_rows(self.keys, indices, group), gather_rows(self.values, indices, group)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write keys, values and metadata to one safetensors file (metadata as JSON)."""
        meta = {
            "format_version": _FORMAT_VERSION,
            "batch_size": self.batch_size,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "max_memories": self.max_memories,
            "pinned": self.pinned,
            "normalize": self.normalize,
            "backend": self._search.name,
            "backend_options": self._backend_options,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        tensors = {"keys": self.keys, "values": self.values, "written": self.written.clone(),
                   **self._search.state_tensors()}
        save_tensors_and_json(path, tensors, "knnmem", meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None,
             backend: str | None = None) -> "KNNMemory":
        """Read a file written by `save`. The file is data: every field is validated before anything
        is built, and any inconsistency raises ValueError naming the file and the field."""
        path = os.fspath(path)
        tensors, meta = read_tensors_and_json(path, "knnmem", "knnmem memory file")
        if meta is None:
            raise ValueError(f"{path} has no knnmem metadata: not written by KNNMemory.save")
        try:
            meta = _validated_metadata(meta, tensors)
            memory = cls(
                meta["batch_size"], meta["heads"], meta["head_dim"], meta["max_memories"],
                backend=backend or meta["backend"], pinned=meta["pinned"], normalize=meta["normalize"],
                device=device, dtype=getattr(torch, meta["dtype"]), backend_options=meta["backend_options"])
            memory._reserve(tensors["keys"].shape[2])
            memory.keys[:, :, :tensors["keys"].shape[2]] = tensors["keys"]
            memory.values[:, :, :tensors["values"].shape[2]] = tensors["values"]
            memory.written.copy_(tensors["written"])
            if backend in (None, meta["backend"]):
                memory._search.load_state(tensors)
            else:  # another backend was asked for: build its indexes from the buffer, in slot order
                for row in range(memory.batch_size):
                    count = int(memory.counts[row])
                    if count:
                        memory._search.on_write(row, torch.arange(count), overwrote=False)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err
        return memory


_DTYPES = ("float16", "bfloat16", "float32")
_MAX_WRITTEN = 1 << 53  # tokens ever written to a row: far beyond any real stream, safe in float64


def _validated_metadata(meta: object, tensors: dict[str, torch.Tensor]) -> dict:
    """Check a memory file's metadata against its tensors (see `KNNMemory.load`)."""
    if not isinstance(meta, dict):
        raise ValueError("metadata must be a JSON object")
    if meta.get("format_version") == 1:  # written before pinned slots existed
        meta.setdefault("pinned", 0)
    elif meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"unsupported format_version {meta.get('format_version')!r} (expected {_FORMAT_VERSION})")
    fields = {"batch_size": int, "heads": int, "head_dim": int, "max_memories": int, "pinned": int,
              "normalize": bool, "backend": str, "backend_options": dict, "dtype": str}
    check_metadata_fields(meta, fields)
    for name in ("batch_size", "heads", "head_dim", "max_memories"):
        if meta[name] <= 0:
            raise ValueError(f"metadata field {name!r} must be positive, got {meta[name]}")
    if meta["dtype"] not in _DTYPES:
        raise ValueError(f"metadata field 'dtype' must be one of {_DTYPES}, got {meta['dtype']!r}")
    if meta["backend"] not in BACKENDS:
        raise ValueError(f"metadata field 'backend' must be one of {BACKENDS}, got {meta['backend']!r}")
    B, M = meta["batch_size"], meta["max_memories"]
    keys = tensors.get("keys")
    allocated = keys.shape[2] if keys is not None and keys.ndim == 4 and keys.shape[2] <= M else M
    shape = (B, meta["heads"], allocated, meta["head_dim"])  # slots allocated when saved, at most M
    for name, expected, dtype in (("keys", shape, meta["dtype"]), ("values", shape, meta["dtype"]),
                                  ("written", (B,), "int64")):
        x = tensors.get(name)
        if x is None or tuple(x.shape) != expected or str(x.dtype) != f"torch.{dtype}":
            got = "missing" if x is None else f"{tuple(x.shape)} {x.dtype}"
            raise ValueError(f"tensor {name!r} must be {expected} {dtype} (at most M={M} slots), got {got}")
    if not bool(torch.isfinite(tensors["keys"]).all() and torch.isfinite(tensors["values"]).all()):
        raise ValueError("tensors 'keys'/'values' contain NaN or inf")
    written = tensors["written"]
    if bool((written < 0).any() or (written >= _MAX_WRITTEN).any()):
        raise ValueError(f"tensor 'written' must hold token counts in [0, 2**53), got {written.tolist()}")
    if int(written.clamp(max=M).max()) > allocated:
        raise ValueError(f"tensor 'keys' holds {allocated} slots, fewer than the stored tokens that 'written' "
                         f"counts ({written.tolist()}, at most M={M} each)")
    return meta


DEFAULT_PINNED = 64  # first tokens of a document kept in a bounded memory (measured: README)


def default_pinned(max_memories: object) -> object:
    """64 pinned tokens, or max_memories // 2 if that is smaller (a bad max_memories is reported
    by the options' check)."""
    if isinstance(max_memories, int) and not isinstance(max_memories, bool):
        return min(DEFAULT_PINNED, max_memories // 2)
    return DEFAULT_PINNED


def check_memory_options(max_memories: object, backend: object, pinned: object) -> None:
    """Checks of the options a layer or a patch passes to the stores it creates on first use,
    so that a bad value fails at construction, not at the first forward."""
    check_positive_int("max_memories", max_memories)
    check_choice("backend", backend, ("auto",) + BACKENDS)
    check_int("pinned", pinned, 0, max_memories - 1)


def parse_rows(rows: object, batch_size: int) -> list[int]:
    """Batch rows named by None (all), an int, a list/tuple of ints, a 1-D integer tensor or a (B,)
    bool mask -> sorted unique ints, all checked to be in [0, batch_size) (bools and floats are not
    row numbers)."""
    if rows is None:
        return list(range(batch_size))
    if isinstance(rows, torch.Tensor):
        if rows.dtype == torch.bool:
            if tuple(rows.shape) != (batch_size,):
                raise ValueError(f"rows as a bool mask must have shape (B={batch_size},), got {tuple(rows.shape)}")
            return rows.nonzero().flatten().tolist()
        if rows.is_floating_point() or rows.is_complex() or rows.ndim > 1:
            raise TypeError(f"rows must be a 1-D integer tensor or a (B,) bool mask, got {rows.dtype} {tuple(rows.shape)}")
        rows = rows.flatten().tolist()
    elif isinstance(rows, int) and not isinstance(rows, bool):
        rows = [rows]
    elif not isinstance(rows, (list, tuple)):
        raise TypeError(f"rows must be None, an int, a list of ints or a tensor, got {type(rows).__name__}")
    bad = [r for r in rows if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < batch_size]
    if bad:
        raise ValueError(f"rows must be integers in [0, {batch_size}), got {bad}")
    return sorted(set(rows))


def memory_for_batch(memory: KNNMemory | None, batch_size: int, reset_hint: str, owned: bool = True,
                     **options) -> KNNMemory:
    """The memory to use for a batch of `batch_size` rows: `memory` itself, or a new
    `KNNMemory(batch_size, **options)` when there is none or when an empty one that we `owned`
    has another batch size or device. A non-empty memory, or a user's own, of another batch size
    raises (rows are documents in progress); `reset_hint` names the call that empties it."""
    device = torch.device(options.get("device") or "cpu")
    if memory is not None and owned and not len(memory) and memory.device != device:
        memory = None
    if memory is not None and memory.batch_size != batch_size:
        if not owned:
            raise ValueError(f"the memory given has batch_size={memory.batch_size}, but the input has "
                             f"{batch_size} rows: give a memory with one row per batch row")
        if len(memory):
            raise ValueError(f"batch size changed from {memory.batch_size} to {batch_size} while the memory "
                             f"holds tokens: call {reset_hint} before changing the batch size")
        memory = None
    return memory if memory is not None else KNNMemory(batch_size, **options)
