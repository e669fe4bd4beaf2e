"""Knowledge memory: the keys and values of reference texts, memorised once and kept.

`MemoryHandle.memorize(texts, tokenizer)` reads each text on its own through the patched model
(local attention only: the document memory is neither read nor written) and keeps what every
memory layer would have written: per layer and KV head, the text's un-rotated keys and values.
The per-document `reset()` leaves it alone. While the model reads anything else, each memory
layer retrieves its top-k from the knowledge memory too, and attends to both (`knnmem.patch`).
Knowledge is read-only while reading and shared by all batch rows; documents never write to it.

Storage forms, and what they cost per memorised token (summed over layers and KV heads, D = head dim):
- `fp16`: every token's key and value: 2 x D x 2 bytes per layer and head.
- `sparse`: Memory3's sparsification: per head, only the `keep` tokens of every `chunk` that received
  the most attention while their text was read, in fp16 (keep / chunk of `fp16`).
- `pq`: keys and values compressed by FAISS product quantisation, `pq_m` codes of `pq_bits` bits per
  vector (pq_m x pq_bits / 8 bytes), plus the codebooks once. Search uses the codes (asymmetric
  distance); retrieved rows are decoded for attention. The codebooks are learnt from the texts of
  the first `memorize` call, which must hold at least 2**pq_bits tokens.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_choice, check_positive_int
from .files import check_metadata_fields, read_tensors_and_json, save_tensors_and_json
from .functional import attend_rows, local_allowed, masked_softmax
from .rows import gather_rows
from .search import as_numpy, exact_search, faiss_module

FORMS = ("fp16", "sparse", "pq")
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Storage:
    """How a knowledge memory stores its keys and values (see the module docstring)."""

    form: str = "fp16"
    keep: int = 8  # sparse: tokens kept per head ...
    chunk: int = 128  # ... out of every `chunk` tokens of a text
    pq_m: int = 16  # pq: sub-quantisers per vector (must divide the head dim)
    pq_bits: int = 8  # pq: bits per code

    def check(self, head_dim: int) -> "Storage":
        check_choice("storage", self.form, FORMS)
        for name in ("keep", "chunk", "pq_m", "pq_bits"):
            check_positive_int(name, getattr(self, name))
        if self.form == "sparse" and self.keep > self.chunk:
            raise ValueError(f"keep ({self.keep}) must be at most chunk ({self.chunk})")
        if self.form == "pq" and head_dim % self.pq_m:
            raise ValueError(f"pq_m must divide the head dim {head_dim}, got {self.pq_m}")
        if self.form == "pq" and not 1 <= self.pq_bits <= 16:
            raise ValueError(f"pq_bits must be in [1, 16], got {self.pq_bits}")
        return self

    def describe(self) -> str:
        if self.form == "sparse":
            return f"sparse({self.keep}/{self.chunk}, fp16)"
        if self.form == "pq":
            return f"pq(m={self.pq_m}, bits={self.pq_bits})"
        return "fp16"


def fold_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, Hq, T, ...) -> (1, Hq, B * T, ...): knowledge is one row that every batch row reads."""
    return x.transpose(0, 1).reshape(1, x.shape[1], x.shape[0] * x.shape[2], *x.shape[3:])


def unfold_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of `fold_batch`."""
    return x.reshape(x.shape[1], batch, x.shape[2] // batch, *x.shape[3:]).transpose(0, 1)


class _DenseLayer:
    """fp16 keys and values of one layer, (H, N, D), searched exactly."""

    def __init__(self, heads: int, head_dim: int, device: torch.device) -> None:
        self.keys = torch.zeros(heads, 0, head_dim, dtype=torch.float16, device=device)
        self.values = torch.zeros_like(self.keys)

    def __len__(self) -> int:
        return self.keys.shape[1]

    def check_add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """ValueError if `add(keys, values)` would fail (checked for every layer before any adds)."""
        if not bool(torch.isfinite(keys.half()).all() and torch.isfinite(values.half()).all()):
            raise ValueError("keys/values exceed the float16 range of the knowledge memory")

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = torch.cat([self.keys, keys.to(self.keys)], dim=1)
        self.values = torch.cat([self.values, values.to(self.values)], dim=1)

    def search(self, q: torch.Tensor, k: int):
        """q: (1, Hq, N, D) -> rows_k, rows_v (1, Hq, N, k, D), valid (1, Hq, N, k)."""
        H, n, D = self.keys.shape
        group = q.shape[1] // H
        _, indices = exact_search(self.keys[None], torch.tensor([n]), q.reshape(1, H, -1, D), k)
        indices = indices.reshape(1, q.shape[1], q.shape[2], k)
        return (gather_rows(self.keys[None], indices, group), gather_rows(self.values[None], indices, group),
                indices >= 0)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys.cpu().contiguous(), "values": self.values.cpu().contiguous()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        H, _, D = self.keys.shape
        keys, values = tensors.get("keys"), tensors.get("values")
        for name, x in (("keys", keys), ("values", values)):
            if x is None or x.dtype != torch.float16 or x.ndim != 3 or (x.shape[0], x.shape[2]) != (H, D):
                raise ValueError(f"tensor {name!r} must be float16 (H={H}, N, D={D}), got "
                                 f"{'missing' if x is None else f'{tuple(x.shape)} {x.dtype}'}")
        if keys.shape != values.shape or not bool(torch.isfinite(keys).all() and torch.isfinite(values).all()):
            raise ValueError("tensors 'keys' and 'values' must have one shape and finite values")
        self.keys, self.values = keys.to(self.keys.device), values.to(self.keys.device)


class _PQLayer:
    """Keys and values of one layer as FAISS product-quantisation codes, one index pair per head."""

    def __init__(self, heads: int, head_dim: int, m: int, bits: int) -> None:
        faiss = faiss_module()

        def index() -> faiss.IndexPQ:
            pq = faiss.IndexPQ(head_dim, m, bits, faiss.METRIC_INNER_PRODUCT)
            pq.pq.cp.min_points_per_centroid = 1  # we check the count ourselves; no warning
            return pq

        self.key_index = [index() for _ in range(heads)]
        self.value_index = [index() for _ in range(heads)]
        self.bits = bits

    def __len__(self) -> int:
        return self.key_index[0].ntotal

    def check_add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """ValueError if `add(keys, values)` would fail (checked for every layer before any adds)."""
        if not bool(torch.isfinite(keys).all() and torch.isfinite(values).all()):
            raise ValueError("keys/values of the knowledge memory must be finite")
        if not self.key_index[0].is_trained and keys.shape[1] < 2 ** self.bits:
            raise ValueError(f"pq storage with pq_bits={self.bits} learns its codebooks from the texts of the "
                             f"first memorize call, which need at least {2 ** self.bits} tokens, got {keys.shape[1]}: "
                             "memorise more text in that call or lower pq_bits")

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        for h, (key_index, value_index) in enumerate(zip(self.key_index, self.value_index)):
            k, v = as_numpy(keys[h]), as_numpy(values[h])
            if not key_index.is_trained:
                key_index.train(k)
                value_index.train(v)
            key_index.add(k)
            value_index.add(v)

    def search(self, q: torch.Tensor, k: int):
        _, Hq, N, D = q.shape
        H = len(self.key_index)
        group = Hq // H
        grouped = q.reshape(H, group * N, D)
        rows_k = torch.zeros(H, group * N, k, D)
        rows_v = torch.zeros_like(rows_k)
        valid = torch.zeros(H, group * N, k, dtype=torch.bool)
        for h in range(H):
            _, ids = self.key_index[h].search(as_numpy(grouped[h]), k)
            found = ids >= 0
            valid[h] = torch.from_numpy(found)
            rows_k[h][valid[h]] = torch.from_numpy(self.key_index[h].reconstruct_batch(ids[found]))
            rows_v[h][valid[h]] = torch.from_numpy(self.value_index[h].reconstruct_batch(ids[found]))
        shape = (1, Hq, N, k)
        return (rows_k.reshape(*shape, D).to(q.device), rows_v.reshape(*shape, D).to(q.device),
                valid.reshape(shape).to(q.device))

    def nbytes(self) -> int:
        """The codes; the codebooks (a fixed cost) are in `codebook_bytes`."""
        return sum(i.sa_code_size() * i.ntotal for i in self.key_index + self.value_index)

    def codebook_bytes(self) -> int:
        return sum(i.pq.centroids.size() * 4 for i in self.key_index + self.value_index)

    def tensors(self) -> dict[str, torch.Tensor]:
        faiss = faiss_module()
        return {f"{kind}.{h}": torch.from_numpy(faiss.serialize_index(index))
                for kind, indexes in (("key_index", self.key_index), ("value_index", self.value_index))
                for h, index in enumerate(indexes)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """The layer's serialised indexes, each present as 1-D uint8 bytes (`_check_pq_tensors`
        checked that before this layer was built)."""
        faiss = faiss_module()
        for kind, indexes in (("key_index", self.key_index), ("value_index", self.value_index)):
            for h, expected in enumerate(indexes):
                data = tensors[f"{kind}.{h}"]
                try:
                    index = faiss.deserialize_index(data.numpy())
                except RuntimeError as err:
                    raise ValueError(f"tensor '{kind}.{h}' is not a readable FAISS index "
                                     f"({str(err).splitlines()[0]})") from None
                if (not isinstance(index, faiss.IndexPQ) or index.d != expected.d or index.pq.M != expected.pq.M
                        or index.pq.nbits != expected.pq.nbits or index.metric_type != faiss.METRIC_INNER_PRODUCT):
                    raise ValueError(f"tensor '{kind}.{h}' must be an inner-product IndexPQ(d={expected.d}, "
                                     f"m={expected.pq.M}, bits={expected.pq.nbits})")
                centroids = faiss.vector_to_array(index.pq.centroids)
                if not index.is_trained or centroids.size != 2 ** index.pq.nbits * index.d:
                    raise ValueError(f"tensor '{kind}.{h}' is an untrained PQ index (no codebooks)")
                if not np.isfinite(centroids).all():
                    raise ValueError(f"tensor '{kind}.{h}' has NaN or inf codebooks")
                indexes[h] = index
        if len({i.ntotal for i in self.key_index + self.value_index}) != 1:
            raise ValueError("the key and value indexes of a layer must hold the same number of tokens")


@dataclass
class Collector:
    """What `MemoryHandle.memorize` collects while one text is read: per memory layer, the
    (un-rotated keys, values, attention received) of every window."""

    layers: list[int]
    importance: bool  # also the attention each key received (the sparse form selects by it)
    parts: dict[int, list] = field(default_factory=dict)

    def collect(self, layer: int, query, key, store_k, value, scaling: float) -> None:
        """One window of `layer`: query (1, Hq, T, D), key/store_k/value (1, Hkv, T, D); the attention
        each key received is summed over the queries of its KV head's group."""
        H, T = key.shape[1], key.shape[2]
        received = torch.zeros(H, T, device=key.device)
        if self.importance:  # only the sparse form needs it
            group = query.shape[1] // H
            logits = (query[0].float() @ key[0].float().repeat_interleave(group, dim=0).transpose(-1, -2)) * scaling
            probs, _ = masked_softmax(logits, local_allowed(T, T, None, key.device)[0])  # causal
            received = probs.sum(dim=1).reshape(H, group, T).sum(dim=1)
        self.parts.setdefault(layer, []).append((store_k[0].detach().float(), value[0].detach().float(), received))

    def text(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The text's (keys, values, importance) per layer, as `KnowledgeMemory.add` takes them."""
        if set(self.parts) != set(self.layers):
            raise RuntimeError("memorize: not every memory layer ran (is this the patched model?)")
        return {layer: tuple(torch.cat(parts, dim=1) for parts in zip(*self.parts[layer])) for layer in self.layers}


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
    elif is_id_list(item):
        ids = torch.tensor(item, dtype=torch.long)
    else:
        raise TypeError(f"memorize takes texts (str), files (os.PathLike) or token ids (1-D integer tensor or list "
                        f"of ints), got {type(item).__name__}")
    if ids.numel() == 0:
        raise ValueError("memorize got an empty text")
    return ids


def is_id_list(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def texts_to_ids(texts, tokenizer) -> list[torch.Tensor]:
    """memorize's `texts` (one item or a list of items, see `token_ids`) -> token id tensors."""
    single = isinstance(texts, (str, os.PathLike, torch.Tensor)) or is_id_list(texts)
    items = [token_ids(item, tokenizer) for item in ([texts] if single else list(texts))]
    if not items:
        raise ValueError("memorize got no texts")
    return items


def sparsify(keys: torch.Tensor, values: torch.Tensor, importance: torch.Tensor, keep: int, chunk: int):
    """Per head, the `keep` most important tokens of every `chunk` (in text order).

    keys, values: (H, n, D); importance: (H, n) -> keys, values (H, n', D), the same n' for every head.
    """
    H, n, D = keys.shape
    picked = []
    for start in range(0, n, chunk):
        scores = importance[:, start:start + chunk]
        top = scores.topk(min(keep, scores.shape[1]), dim=1).indices.sort(dim=1).values
        picked.append(top + start)
    index = torch.cat(picked, dim=1)[..., None].expand(-1, -1, D)
    return keys.gather(1, index), values.gather(1, index)


class KnowledgeMemory:
    """The knowledge memory of a patched model: per memory layer, the stored keys and values of
    the memorised texts (`MemoryHandle.memorize` fills it; `save` / `load` keep it).

    Args:
        layers: the memory layers it serves. kv_heads, head_dim: of the model's attention.
        normalize: keys are L2-normalised (a handle with logits="normalized").
        storage: a `Storage` (form and its options).
        model: a fingerprint of the model and its memory placement that wrote it; a handle
            refuses knowledge written by another model (`model_fingerprint`).
    """

    def __init__(self, layers: list[int], kv_heads: int, head_dim: int, normalize: bool, storage: Storage,
                 model: str, device: torch.device | str = "cpu") -> None:
        self.layers, self.kv_heads, self.head_dim = list(layers), kv_heads, head_dim
        self.normalize, self.storage, self.model = normalize, storage.check(head_dim), model
        self.tokens, self.texts = 0, 0  # memorised (before sparsification)
        device = torch.device(device)
        self.stores = {layer: self._new_store(device) for layer in self.layers}

    def _new_store(self, device: torch.device):
        if self.storage.form == "pq":
            return _PQLayer(self.kv_heads, self.head_dim, self.storage.pq_m, self.storage.pq_bits)
        return _DenseLayer(self.kv_heads, self.head_dim, device)

    def __len__(self) -> int:
        """Stored tokens per layer and head."""
        return len(self.stores[self.layers[0]])

    def __repr__(self) -> str:
        return (f"KnowledgeMemory(texts={self.texts}, tokens={self.tokens}, stored={len(self)}, "
                f"storage={self.storage.describe()}, layers={len(self.layers)}, bytes={self.nbytes()})")

    def add(self, texts: list[dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]) -> None:
        """Store texts. Each maps every layer to (keys, values, importance): (H, n, D), (H, n, D), (H, n)
        (importance: the attention each token received, used by the sparse form). PQ codebooks are
        learnt from the first call's texts together. All or nothing: every layer's rows are checked
        before any layer stores them."""
        for text in texts:
            if set(text) != set(self.layers):
                raise ValueError(f"a text must be stored in every layer {self.layers}, got {sorted(text)}")
        rows = {}
        for layer in self.layers:
            keys, values = [], []
            for text in texts:
                k, v, importance = text[layer]
                if self.normalize:
                    k = F.normalize(k.float(), dim=-1)
                if self.storage.form == "sparse":
                    k, v = sparsify(k, v, importance, self.storage.keep, self.storage.chunk)
                keys.append(k)
                values.append(v)
            rows[layer] = torch.cat(keys, dim=1), torch.cat(values, dim=1)
            self.stores[layer].check_add(*rows[layer])
        for layer, (k, v) in rows.items():
            self.stores[layer].add(k, v)
        self.tokens += sum(text[self.layers[0]][0].shape[1] for text in texts)
        self.texts += len(texts)

    def search(self, layer: int, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k stored rows of each query of `layer`, for every batch row alike.
        q: (B, Hq, T, D) -> keys, values (B, Hq, T, k', D), valid (B, Hq, T, k'), with
        k' = min(k, stored tokens), at least 1 (never padded beyond what is stored)."""
        B, Hq, T, D = q.shape
        k = min(k, max(1, len(self)))
        if len(self) == 0:
            empty = torch.zeros(B, Hq, T, k, D, device=q.device)
            return empty, empty, torch.zeros(B, Hq, T, k, dtype=torch.bool, device=q.device)
        folded = fold_batch(q.detach())
        rows_k, rows_v, valid = self.stores[layer].search(F.normalize(folded.float(), dim=-1) if self.normalize
                                                          else folded, k)
        return unfold_batch(rows_k, B), unfold_batch(rows_v, B), unfold_batch(valid, B)

    def attend(self, layer: int, q: torch.Tensor, k: int, logits: str, scale: float,
               memory_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The knowledge branch of `layer`: q (B, Hq, T, D) attends to its top-k stored rows.
        Returns (out (B, Hq, T, D), lse (B, Hq, T)); lse = -inf where nothing is stored."""
        rows_k, rows_v, valid = self.search(layer, q, k)
        return attend_rows(q, rows_k, rows_v, valid, logits, scale, memory_scale)

    # ------------------------------------------------------------------ size
    def nbytes(self) -> int:
        """Bytes of the stored keys and values (PQ: codes; codebooks in `overhead_bytes`)."""
        return sum(store.nbytes() for store in self.stores.values())

    def overhead_bytes(self) -> int:
        """Fixed bytes that do not grow with the tokens stored (PQ codebooks)."""
        return sum(store.codebook_bytes() for store in self.stores.values()) if self.storage.form == "pq" else 0

    def bytes_per_token(self) -> float:
        """Stored bytes per memorised token, all layers and heads (before sparsification: a sparse
        memory's bytes are divided by every token of its texts)."""
        return self.nbytes() / self.tokens if self.tokens else 0.0

    # ------------------------------------------------------------------ persistence
    def _meta(self) -> dict:
        return {"format_version": _FORMAT_VERSION, "layers": self.layers, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "normalize": self.normalize, "storage": asdict(self.storage),
                "model": self.model, "tokens": self.tokens, "texts": self.texts}

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: every layer's tensors (or serialised PQ indexes) and JSON metadata."""
        tensors = {f"layer.{layer}.{name}": x for layer, store in self.stores.items()
                   for name, x in store.tensors().items()}
        save_tensors_and_json(path, tensors, "knnmem_knowledge", self._meta())

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "KnowledgeMemory":
        """Read a file written by `save`; every field is checked (ValueError naming the file)."""
        path = os.fspath(path)
        tensors, meta = read_tensors_and_json(path, "knnmem_knowledge", "knnmem knowledge file")
        try:
            memory = _from_metadata(meta, device, tensors)
            for layer, store in memory.stores.items():
                prefix = f"layer.{layer}."
                store.load({name[len(prefix):]: x for name, x in tensors.items() if name.startswith(prefix)})
            unknown = [n for n in tensors if not any(n.startswith(f"layer.{i}.") for i in memory.layers)]
            if unknown:
                raise ValueError(f"tensors {unknown[:3]} belong to no layer of the file")
            if len({len(store) for store in memory.stores.values()}) > 1:
                raise ValueError("every layer must hold the same number of stored tokens")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err
        return memory


def _check_pq_tensors(layers: list[int], kv_heads: int, head_dim: int, storage: Storage,
                      tensors: dict[str, torch.Tensor]) -> None:
    """Before any PQ index is built (each holds 2^bits x head_dim float codebooks): the file must
    hold every index the metadata names, each at least as large as its codebooks, so that the
    memory built is bounded by the file's own size."""
    codebook_bytes = 4 * 2 ** storage.pq_bits * head_dim
    for layer in layers:
        for kind in ("key_index", "value_index"):
            for h in range(kv_heads):
                data = tensors.get(f"layer.{layer}.{kind}.{h}")
                if data is None or data.dtype != torch.uint8 or data.ndim != 1:
                    raise ValueError(f"tensor 'layer.{layer}.{kind}.{h}' must be a serialised FAISS index (uint8 bytes)")
                if data.numel() < codebook_bytes:
                    raise ValueError(f"tensor 'layer.{layer}.{kind}.{h}' holds {data.numel()} bytes, fewer than the "
                                     f"{codebook_bytes} of the codebooks its metadata declares (pq_bits="
                                     f"{storage.pq_bits}, head_dim={head_dim})")


def _from_metadata(meta: object, device, tensors: dict[str, torch.Tensor]) -> KnowledgeMemory:
    if not isinstance(meta, dict) or meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"not a knnmem knowledge file of format {_FORMAT_VERSION}")
    fields = {"layers": list, "kv_heads": int, "head_dim": int, "normalize": bool, "storage": dict, "model": str,
              "tokens": int, "texts": int}
    check_metadata_fields(meta, fields)
    layers = meta["layers"]
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise ValueError(f"metadata field 'layers' must be a non-empty list of layer indices, got {layers!r}")
    for name in ("kv_heads", "head_dim"):
        check_positive_int(name, meta[name])
    if meta["tokens"] < 0 or meta["texts"] < 0:
        raise ValueError("metadata fields 'tokens' and 'texts' must be >= 0")
    unknown = set(meta["storage"]) - set(Storage.__dataclass_fields__)
    if unknown:
        raise ValueError(f"metadata field 'storage' has unknown options {sorted(unknown)}")
    storage = Storage(**meta["storage"]).check(meta["head_dim"])
    if storage.form == "pq":
        _check_pq_tensors(layers, meta["kv_heads"], meta["head_dim"], storage, tensors)
    memory = KnowledgeMemory(layers, meta["kv_heads"], meta["head_dim"], meta["normalize"], storage, meta["model"],
                             device)
    memory.tokens, memory.texts = meta["tokens"], meta["texts"]
    return memory
