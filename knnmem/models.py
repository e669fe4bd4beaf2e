"""`MemorizingTransformer`: a small decoder-only language model with kNN memory layers, for
training from scratch (the paper's setting: one memory layer at ~75% depth).

    config = MemorizingConfig(vocab_size=256, dim=256, depth=6, heads=4, max_memories=8192, xl_cache=True)
    model = MemorizingTransformer(config)
    for segment in document.split(512, dim=1):          # (B, 512) token ids, one document per row
        logits = model(segment).logits                  # memory fills as segments are read
    model.reset_memory()                                # before the next documents

Pre-norm blocks (LayerNorm, GELU MLP), rotary positions in local attention (except in
`nope_layers`) and none for memories (or, with memory_position="window_start", memories read as
keys at the local window's first position), tied input/output embeddings. Every layer keeps an
optional Transformer-XL cache.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_number, check_positive_int
from .layer import CausalAttention, KNNAttention


@dataclass
class MemorizingConfig:
    """Shape of a `MemorizingTransformer`.

    memory_layers: indices of the kNN memory layers; None = one layer at 75% depth; [] = none.
    max_memories: tokens kept per (document, KV head) by each memory layer.
    nope_layers: indices of layers whose local attention has no rotary positions (NoPE; positions
        still reach them through the layers below). A memory layer among them matches queries to
        keys by content alone both locally and in memory, as the paper's memory layer does under
        T5's additive position bias: what it learns to match locally it can then find in memory.
    """

    vocab_size: int = 256
    dim: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: int = 4
    memory_layers: list[int] | None = None
    max_memories: int = 8192
    topk: int = 32
    xl_cache: bool = False
    rope_base: float = 10000.0
    memory_backend: str = "auto"
    memory_position: str = "none"  # "window_start": memories read at the local window's first position (KNNAttention)
    nope_layers: list[int] | None = None  # None or []: rotary positions in every layer

    def resolved_memory_layers(self) -> list[int]:
        if self.memory_layers is None:
            return [self.depth * 3 // 4]
        return sorted(set(self.memory_layers))

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "depth", "heads", "mlp_ratio", "max_memories", "topk"):
            check_positive_int(name, getattr(self, name))
        if self.rope_base is not None and check_number("rope_base", self.rope_base) <= 1:
            raise ValueError(f"rope_base must be a number > 1 or None (as CausalAttention's), got {self.rope_base!r}")
        for name in ("memory_layers", "nope_layers"):
            layers = getattr(self, name)
            if layers is not None and not isinstance(layers, (list, tuple)):
                raise ValueError(f"{name} must be a list of layer indices or None, got {layers!r}")
            bad = [i for i in (layers or []) if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"{name} must be layer indices in [0, depth={self.depth}), got {layers}")
        if self.nope_layers and self.memory_position != "none" and \
                set(self.nope_layers) & set(self.resolved_memory_layers()):
            raise ValueError(f"memory_position={self.memory_position!r} places memories among rotary positions: "
                             f"a memory layer in nope_layers={self.nope_layers} has none")


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, vocab_size)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: MemorizingConfig, memory: bool, rotary: bool = True) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)
        common = dict(dim=config.dim, heads=config.heads, xl_cache=config.xl_cache,
                      rope_base=config.rope_base if rotary else None)
        with warnings.catch_warnings():
            if not rotary:  # a NoPE layer's XL cache is placed by the rotary layers below it
                warnings.filterwarnings("ignore", message="xl_cache=True without rope_base")
            self.attn = self._attention(config, memory, common)
        hidden = config.mlp_ratio * config.dim
        self.mlp = nn.Sequential(nn.Linear(config.dim, hidden), nn.GELU(), nn.Linear(hidden, config.dim))

    @staticmethod
    def _attention(config: MemorizingConfig, memory: bool, common: dict) -> nn.Module:
        if not memory:
            return CausalAttention(**common)
        return KNNAttention(**common, topk=config.topk, max_memories=config.max_memories,
                            memory_backend=config.memory_backend, memory_position=config.memory_position)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attention_mask)
        return x + self.mlp(self.norm2(x))


class MemorizingTransformer(nn.Module):
    """Decoder-only LM over one segment per call; memory layers remember earlier segments."""

    def __init__(self, config: MemorizingConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        memory_layers, nope_layers = set(config.resolved_memory_layers()), set(config.nope_layers or [])
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, i in memory_layers, rotary=i not in nope_layers)
                                    for i in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def stateful(self) -> bool:
        """True if calls remember earlier segments (memory layers or XL caches): such a model
        reads a document segment by segment, without a recomputed local context."""
        return bool(self.config.resolved_memory_layers()) or self.config.xl_cache

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def reset_memory(self, rows: int | list[int] | None = None) -> None:
        """Forget memories and XL caches of all rows, or of the given rows (new documents)."""
        for block in self.blocks:
            block.attn.reset_memory(rows)

    @torch.no_grad()
    def refresh_cache(self, previous: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Recompute every layer's XL cache from `previous` (B, T), the segment it holds, with the
        current weights (training: a cache computed before the last optimizer step is stale).
        The stale entry is dropped, not written to memory; `previous` reads memory as before, and
        enters memory when the next segment is read. No-op without an XL cache."""
        if not self.config.xl_cache:
            return
        for block in self.blocks:
            block.attn.cache.entry = None
        self(previous, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False) -> LMOutput:
        """input_ids: (B, T) int64; attention_mask: optional (B, T), 0 = padding. `use_cache` is
        accepted for call compatibility with transformers models and must be False."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a (B, T) int64 tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if use_cache:
            raise ValueError("MemorizingTransformer has no generation KV cache: call it with use_cache=False")
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size})")
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, attention_mask)
        return LMOutput(self.norm(x) @ self.embed.weight.T)
