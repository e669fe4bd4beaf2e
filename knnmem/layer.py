"""Attention layers for models built from scratch: `CausalAttention` (local attention, with an
optional Transformer-XL cache and RoPE) and `KNNAttention`, the drop-in layer that adds a kNN memory."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ._checks import check_choice, check_positive_int, check_tensor
from .functional import LOGITS, MODES, knn_attention, local_attention
from .memory import KNNMemory, check_memory_options, default_pinned, memory_for_batch
from .positions import apply_rotary, rope_angles

MEMORY_POSITIONS = ("none", "window_start")  # where KNNAttention reads its memories (class docstring)
DEFAULT_ROPE_BASE = 10000.0  # local rotary positions of a layer with an XL cache


class XLCache:
    """The previous segment's keys/values (B, Hkv, T, D) and validity (B, T), detached."""

    def __init__(self) -> None:
        self.entry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def window(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
        """The local keys/values/validity of this call: the cached segment, then the new one."""
        if self.entry is not None and self.entry[0].shape[0] != k.shape[0]:
            if bool(self.entry[2].any()):
                raise ValueError(f"batch size changed from {self.entry[0].shape[0]} to {k.shape[0]} while the XL "
                                 "cache holds tokens: call reset_memory() before changing the batch size")
            self.entry = None
        if self.entry is None:
            return k, v, valid
        return tuple(torch.cat([old, new], dim=d) for old, new, d in zip(self.entry, (k, v, valid), (2, 2, 1)))

    def push(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
        """Cache the new segment; return the entry it replaces (which leaves the local context), or None."""
        evicted, self.entry = self.entry, (k.detach(), v.detach(), valid.clone())
        return evicted

    def clear(self, rows: int | list[int] | None = None) -> None:
        if rows is None:
            self.entry = None
        elif self.entry is not None:
            self.entry[2][torch.as_tensor(rows if isinstance(rows, list) else [rows])] = False


class CausalAttention(nn.Module):
    """Causal multi-head self-attention over one segment per batch row (grouped-query heads).

    Args:
        dim: model width. heads: query heads. head_dim: default dim // heads.
        kv_heads: key/value heads (grouped-query attention), default heads.
        xl_cache: also attend to the previous segment's keys/values (Transformer-XL): batch rows
            are documents read segment by segment; `reset_memory(rows)` at a new document.
        rope_base: rotary position embedding base for local attention. "auto" (default): 10000.0
            with `xl_cache` (positions over the cached segment and the new one, as a retrofitted
            model's), None without it (no positions: the model provides them). None with
            `xl_cache` leaves the two segments unordered, and a warning says so.
        bias: use biases in the projections.
    """

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, kv_heads: int | None = None,
                 xl_cache: bool = False, rope_base: float | str | None = "auto", bias: bool = False) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.heads = check_positive_int("heads", heads)
        self.kv_heads = check_positive_int("kv_heads", kv_heads or heads)
        if heads % self.kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if head_dim is None and dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}), or give head_dim")
        self.head_dim = check_positive_int("head_dim", head_dim or dim // heads)
        if rope_base == "auto":
            rope_base = DEFAULT_ROPE_BASE if xl_cache else None
        if rope_base is not None and (not isinstance(rope_base, (int, float)) or not rope_base > 1
                                      or self.head_dim % 2):
            raise ValueError(f"rope_base must be a number > 1 with an even head_dim, got {rope_base!r} "
                             f"(head_dim {self.head_dim})")
        self.xl_cache, self.rope_base = xl_cache, rope_base
        if xl_cache and rope_base is None:
            warnings.warn("xl_cache=True without rope_base: the cached segment has no position relative to the new "
                          "one (and absolute position embeddings added to x would repeat 0..T-1 in both); pass "
                          "rope_base (e.g. 10000.0, the default with xl_cache) for relative positions over both segments",
                          stacklevel=2)
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=bias)
        self.cache = XLCache()

    def reset_memory(self, rows: int | list[int] | None = None) -> None:
        """Forget the XL cache of all rows or of the given rows (new documents there)."""
        self.cache.clear(rows)

    def _project(self, x: torch.Tensor, attention_mask: torch.Tensor | None):
        """x: (B, T, dim) -> q (B, H, T, D), k, v (B, Hkv, T, D), valid (B, T) bool."""
        check_tensor("x", x, 3, f"(B, T, dim={self.dim})")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, T, dim={self.dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        if attention_mask is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        elif tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must have shape (B={B}, T={T}), got {tuple(attention_mask.shape)}")
        else:
            valid = attention_mask.bool()
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v, valid

    def _local(self, q, k, v, valid):
        """The local attention's inputs: (q, k, v, mask or None), k/v/mask over cache + segment,
        q and k rotated to their positions in that window when RoPE is on."""
        local_k, local_v, local_valid = self.cache.window(k, v, valid) if self.xl_cache else (k, v, valid)
        if self.rope_base is not None:
            T, S = q.shape[2], local_k.shape[2]
            cos, sin = rope_angles(S, self.head_dim, self.rope_base, device=q.device)
            q = apply_rotary(q, cos[:, S - T:], sin[:, S - T:])
            local_k = apply_rotary(local_k, cos, sin)
        return q, local_k, local_v, None if bool(local_valid.all()) else local_valid

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim); attention_mask: optional (B, T) bool/0-1, 0 = padding. -> (B, T, dim)."""
        q, k, v, valid = self._project(x, attention_mask)
        local_q, local_k, local_v, mask = self._local(q, k, v, valid)
        out, _ = local_attention(local_q, local_k, local_v, self.head_dim**-0.5, mask)
        if self.xl_cache:
            self.cache.push(k, v, valid)
        return self._output(out)


class KNNAttention(CausalAttention):
    """Causal self-attention over the segment plus top-k attention over earlier segments.

    Each forward call (one segment per batch row) retrieves the `topk` nearest memories of every
    query, attends locally and to memory (`knnmem.functional.knn_attention`), then writes the
    segment's keys/values (detached) into memory. Batch rows are independent documents; call
    `reset_memory(rows)` when a row starts a new document.

    With `xl_cache`, the previous segment is local context, and a segment enters memory only when
    it leaves the cache (the delayed write): no token is both attended locally and retrieved.
    With `rope_base` (by default with `xl_cache`), local attention is rotary; memories are stored
    without positions and, with memory_position="none", read without them too; "window_start"
    reads them with the rotated query, as if every memory sat at the local window's first position
    (just beyond the farthest local key, as InfLLM places its memories): what a rotary head has
    learnt to match locally then matches memories the same way.

    Args (besides `CausalAttention`'s):
        topk: memories retrieved per query. max_memories: capacity per (row, KV head).
        mode: "gate" (learned per-head sigmoid gate, initialised at 0.5) or "joint".
        logits: "normalized" (the paper's: cosine times a learned per-head scale) or "raw".
        pinned: the first `pinned` tokens of each document stay in memory when it overflows
            (None: 64, or half a smaller memory, as `knnmem.patch`).
        memory_backend: search backend of the owned memory ("auto", "exact", "ivf", ...).
        memory: an existing `KNNMemory` to use instead of the layer's own (`attn.memory`: empty
            until the first forward, which sizes it to the input's batch and device).
        memory_position: "none" or "window_start" (see above; needs rope_base).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int | None = None,
        kv_heads: int | None = None,
        topk: int = 32,
        max_memories: int = 65536,
        mode: str = "gate",
        logits: str = "normalized",
        xl_cache: bool = False,
        memory_backend: str = "auto",
        memory: KNNMemory | None = None,
        bias: bool = False,
        pinned: int | None = None,
        rope_base: float | str | None = "auto",
        memory_position: str = "none",
    ) -> None:
        super().__init__(dim, heads, head_dim, kv_heads, xl_cache=xl_cache, rope_base=rope_base, bias=bias)
        check_choice("mode", mode, MODES)
        check_choice("memory_position", memory_position, MEMORY_POSITIONS)
        if memory_position != "none" and self.rope_base is None:
            raise ValueError(f"memory_position={memory_position!r} places memories among rotary positions: "
                             "it needs rope_base")
        self.memory_position = memory_position
        check_choice("logits", logits, LOGITS)
        self.topk = check_positive_int("topk", topk)
        self.max_memories = check_positive_int("max_memories", max_memories)
        pinned = default_pinned(max_memories) if pinned is None else pinned
        check_memory_options(max_memories, memory_backend, pinned)
        self.mode, self.logits, self.memory_backend, self.pinned = mode, logits, memory_backend, pinned
        self.gate = nn.Parameter(torch.zeros(heads))  # sigmoid(0) = 0.5, as in the paper's code
        # Unit-norm q.k lies in [-1, 1]; sqrt(D) puts it on the scale of q.k / sqrt(D) at init.
        self.memory_scale = nn.Parameter(torch.full((heads,), self.head_dim**0.5))
        if memory is not None and not isinstance(memory, KNNMemory):
            raise TypeError(f"memory must be a KNNMemory or None, got {type(memory).__name__}")
        self._owns_memory = memory is None
        self._memory_options = dict(heads=self.kv_heads, head_dim=self.head_dim, max_memories=max_memories,
                                    backend=memory_backend, pinned=pinned, normalize=logits == "normalized")
        # An owned memory exists from the start (empty, one row, on the CPU); the first forward
        # replaces it by one of the input's batch size and device while it is empty.
        self.memory = memory if memory is not None else KNNMemory(1, **self._memory_options)

    def extra_repr(self) -> str:
        stored = self.memory.counts.tolist()
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, topk={self.topk}, "
                f"max_memories={self.max_memories}, mode={self.mode!r}, logits={self.logits!r}, "
                f"pinned={self.pinned}, stored={stored}")

    def _memory_for(self, x: torch.Tensor) -> KNNMemory:
        self.memory = memory_for_batch(self.memory, x.shape[0], "reset_memory()", owned=self._owns_memory,
                                       device=x.device, **self._memory_options)
        expected = (self.kv_heads, self.head_dim, self.logits == "normalized")
        if (self.memory.heads, self.memory.head_dim, self.memory.normalize) != expected:
            raise ValueError(f"memory must have heads={expected[0]}, head_dim={expected[1]}, "
                             f"normalize={expected[2]} for this layer, got {self.memory!r}")
        return self.memory

    def reset_memory(self, rows: int | list[int] | None = None) -> None:
        """Forget the memory (and XL cache) of all rows or of the given rows (new documents)."""
        if len(self.memory) or not self._owns_memory:  # an empty owned memory is resized by the next forward
            self.memory.clear(rows)
        super().reset_memory(rows)

    def memory_query(self, q: torch.Tensor, local_q: torch.Tensor) -> torch.Tensor:
        """The query that searches and reads memory: q (B, H, T, D) as projected, or local_q, the
        same rotated to its window positions, with memory_position="window_start"."""
        return local_q if self.memory_position == "window_start" else q

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim); attention_mask: optional (B, T) bool/0-1, 0 = padding. -> (B, T, dim)."""
        q, k, v, valid = self._project(x, attention_mask)
        memory = self._memory_for(x)
        local_q, local_k, local_v, mask = self._local(q, k, v, valid)
        memory_q = self.memory_query(q, local_q)
        _, indices = memory.search(memory_q.detach(), self.topk)
        out = knn_attention(
            local_q, local_k, local_v, memory.keys, memory.values, indices.to(x.device), self.gate,
            memory_scale=self.memory_scale, mode=self.mode, logits=self.logits, attention_mask=mask,
            memory_q=memory_q,
        )
        if self.xl_cache:  # the cached segment leaves the local context now: it enters memory
            evicted = self.cache.push(k, v, valid)
            if evicted is not None:
                memory.add(*evicted[:2], mask=evicted[2])
        else:
            memory.add(k.detach(), v.detach(), mask=valid)
        return self._output(out)
