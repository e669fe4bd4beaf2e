"""Index math over stored rows: slots of a (B, H, M, D) table read by (B, Hq, T, k) indices.

Query head j reads KV head j // group (grouped-query attention); -1 marks an empty slot. Shared
by the store (`KNNMemory.gather`), the PyTorch reference (`knnmem.functional`) and knowledge
memory; it imports nothing from knnmem, so reading `functional` never pulls in faiss.
"""
from __future__ import annotations

import torch


def check_indices(indices: torch.Tensor, max_memories: int) -> None:
    """Raise unless every index is a slot in [0, max_memories) or -1 (empty): an index past the
    end would silently read another row's or head's memory."""
    if indices.numel() == 0:
        return
    lo, hi = torch.aminmax(indices)
    if int(lo) < -1 or int(hi) >= max_memories:
        raise ValueError(f"indices must be slots in [0, M={max_memories}) or -1 (empty), "
                         f"got values in [{int(lo)}, {int(hi)}]")


def flat_rows(indices: torch.Tensor, heads: int, slots: int, group: int) -> torch.Tensor:
    """Row numbers in a (B * heads * slots, D) view of a (B, heads, slots, D) table.

    indices: (B, heads * group, T, k) slots, -1 = empty -> same shape, int64; query head j reads
    KV head j // group. Empty slots point at the row's slot 0 (callers give them zero weight).
    """
    B = indices.shape[0]
    head = torch.arange(indices.shape[1], device=indices.device) // group
    base = (torch.arange(B, device=indices.device)[:, None] * heads + head[None, :]) * slots  # (B, Hq)
    return base[:, :, None, None] + indices.clamp(min=0).long()


def gather_rows(table: torch.Tensor, indices: torch.Tensor, group: int, zero_empty: bool = True) -> torch.Tensor:
    """table: (B, H, M, D); indices: (B, H * group, T, k), -1 = empty -> (B, H * group, T, k, D).

    Empty slots read as zeros, or, with zero_empty=False, as some finite stored row (cheaper, for
    callers that give empty slots zero weight).
    """
    B, H, M, D = table.shape
    flat = flat_rows(indices, H, M, group)
    rows = table.reshape(B * H * M, D)[flat.flatten()].reshape(*indices.shape, D)
    return rows.masked_fill((indices < 0)[..., None], 0) if zero_empty else rows
