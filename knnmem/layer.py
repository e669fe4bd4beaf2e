"""`KNNAttention`: a drop-in multi-head attention layer with a kNN memory."""
from __future__ import annotations

import torch
from torch import nn

from ._checks import check_positive_int, check_tensor
from .functional import LOGITS, MODES, knn_attention
from .memory import KNNMemory, check_memory_options, memory_for_batch


class KNNAttention(nn.Module):
    """Causal self-attention over the segment plus top-k attention over earlier segments.

    Each forward call (one segment per batch row) retrieves the `topk` nearest memories of every
    query, attends locally and to memory (`knnmem.functional.knn_attention`), then writes the
    segment's keys/values (detached) into memory. Batch rows are independent documents; call
    `reset_memory(rows)` when a row starts a new document.

    With `xl_cache`, the previous segment is local context, and a segment enters memory only when
    it leaves the cache (the delayed write): no token is both attended locally and retrieved.

    Args:
        dim: model width. heads: query heads. head_dim: default dim // heads.
        kv_heads: key/value heads (grouped-query attention), default heads.
        topk: memories retrieved per query. max_memories: capacity per (row, KV head).
        mode: "gate" (learned per-head sigmoid gate, initialised at 0.5) or "joint".
        logits: "normalized" (the paper's: cosine times a learned per-head scale) or "raw".
        xl_cache: also attend locally to the previous segment's keys/values (Transformer-XL).
        pinned: the first `pinned` tokens of each document stay in memory when it overflows.
        memory_backend: search backend of the owned memory ("auto", "exact", "ivf", ...).
        memory: an existing `KNNMemory` to use instead of creating one on the first call.
        bias: use biases in the projections.
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
        pinned: int = 0,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.heads = check_positive_int("heads", heads)
        self.kv_heads = check_positive_int("kv_heads", kv_heads or heads)
        if heads % self.kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if head_dim is None and dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}), or give head_dim")
        self.head_dim = check_positive_int("head_dim", head_dim or dim // heads)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if logits not in LOGITS:
            raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
        self.topk = check_positive_int("topk", topk)
        self.max_memories = check_positive_int("max_memories", max_memories)
        check_memory_options(max_memories, memory_backend, pinned)
        self.mode, self.logits, self.xl_cache, self.memory_backend = mode, logits, xl_cache, memory_backend
        self.pinned = pinned
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=bias)
        self.gate = nn.Parameter(torch.zeros(heads))  # sigmoid(0) = 0.5, as in the paper's code
        # Unit-norm q.k lies in [-1, 1]; sqrt(D) puts it on the scale of q.k / sqrt(D) at init.
        self.memory_scale = nn.Parameter(torch.full((heads,), self.head_dim**0.5))
        if memory is not None and not isinstance(memory, KNNMemory):
            raise TypeError(f"memory must be a KNNMemory or None, got {type(memory).__name__}")
        self.memory, self._owns_memory = memory, memory is None
        self._xl: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # k, v, valid (B, S)

    def _memory_for(self, x: torch.Tensor) -> KNNMemory:
        self.memory = memory_for_batch(
            self.memory, x.shape[0], "reset_memory()", owned=self._owns_memory, heads=self.kv_heads, head_dim=self.head_dim,
            max_memories=self.max_memories, backend=self.memory_backend, pinned=self.pinned,
            normalize=self.logits == "normalized", device=x.device)
        expected = (self.kv_heads, self.head_dim, self.logits == "normalized")
        if (self.memory.heads, self.memory.head_dim, self.memory.normalize) != expected:
            raise ValueError(f"memory must have heads={expected[0]}, head_dim={expected[1]}, "
                             f"normalize={expected[2]} for this layer, got {self.memory!r}")
        return self.memory

    def reset_memory(self, rows: int | list[int] | None = None) -> None:
        """Forget the memory (and XL cache) of all rows or of the given rows (new documents)."""
        if self.memory is not None:
            self.memory.clear(rows)
        if self._xl is not None:
            if rows is None:
                self._xl = None
            else:
                self._xl[2][torch.as_tensor(rows if isinstance(rows, list) else [rows])] = False

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim); attention_mask: optional (B, T) bool/0-1, 0 = padding. -> (B, T, dim)."""
        check_tensor("x", x, 3, f"(B, T, dim={self.dim})")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, T, dim={self.dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask must have shape (B={B}, T={T}), got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.bool()
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        memory = self._memory_for(x)
        _, indices = memory.search(q.detach(), self.topk)
        valid = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        local_k, local_v, local_valid = k, v, valid
        if self._xl is not None and self._xl[0].shape[0] != B:
            if bool(self._xl[2].any()):
                raise ValueError(f"batch size changed from {self._xl[0].shape[0]} to {B} while the XL cache "
                                 "holds tokens: call reset_memory() before changing the batch size")
            self._xl = None
        if self._xl is not None:
            local_k = torch.cat([self._xl[0], k], dim=2)
            local_v = torch.cat([self._xl[1], v], dim=2)
            local_valid = torch.cat([self._xl[2], valid], dim=1)
        out = knn_attention(
            q, local_k, local_v, memory.keys, memory.values, indices.to(x.device), self.gate,
            memory_scale=self.memory_scale, mode=self.mode, logits=self.logits,
            attention_mask=None if bool(local_valid.all()) else local_valid,
        )
        if self.xl_cache:  # the cached segment leaves the local context now: it enters memory
            if self._xl is not None:
                memory.add(*self._xl[:2], mask=self._xl[2])
            self._xl = (k.detach(), v.detach(), valid.clone())
        else:
            memory.add(k.detach(), v.detach(), mask=valid)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
