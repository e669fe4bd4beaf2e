"""Rotary positions and where memories sit relative to the queries that read them.

Rotary models (Llama, GPT-NeoX) hand the attention function keys already rotated to their
absolute positions. A key rotated once would carry a stale position forever, so memory stores
keys *un-rotated* (`undo_rotary`), and each read places them by a policy, by rotating the
memory branch's query instead (q_p . R_j k = R_{-j} q_p . k: rotating the query by -j is the
same as rotating every memory key to j):

- `constant`: every memory at one fixed distance `distance` before the query (InfLLM-style):
  the query is rotated to position `distance`. Training-free retrofits work best with it
  (see the README's evaluation table).
- `start`: every memory at the start of the local window (LongLLaMA-style): the query keeps its
  distance from the window start.
- `none`: no rotation at all on the memory branch (un-rotated query and keys).

GPT-2 has absolute position embeddings added to the residual stream, not rotations: its keys
already mix in the position they were written at, nothing can be undone, and a memory written
at position p looks "p tokens into its window" to later readers.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ._checks import check_choice

POLICIES = ("constant", "start", "none")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (B, T, R) with R <= D (only the first R dims rotate)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + sign * rotate_half(rot) * sin, rest], dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate x (B, H, T, D) by the angles of cos/sin (B, T, R), as transformers does."""
    return _rotate(x, cos, sin, 1.0)


def undo_rotary(x, cos, sin):
    """Inverse of `apply_rotary`: recover the un-rotated vectors."""
    return _rotate(x, cos, sin, -1.0)


@functools.lru_cache(maxsize=16)
def rope_angles(n: int, dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, n, dim) of positions 0..n-1 for `apply_rotary` (Llama's RoPE layout).
    Cached: every layer of a model reads the same window sizes (never modify the results)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)[None]
    return angles.cos(), angles.sin()


class RotaryPlacement:
    """Un-rotates keys for storage and builds the memory branch's queries, for one model.

    rotary: the model's rotary embedding module, called as rotary(x, position_ids) -> (cos, sin).
    The (cos, sin) of a position tensor are computed once and reused by every memory layer of
    the same forward pass (they all receive the same position tensor).
    """

    def __init__(self, rotary: nn.Module, policy: str = "constant", distance: int = 512) -> None:
        check_choice("position", policy, POLICIES)
        self.rotary, self.policy, self.distance = rotary, policy, int(distance)
        self._angles: dict[str, tuple] = {}  # "read"/"stored" -> (positions, dtype, cos, sin)

    def _cos_sin(self, slot: str, x: torch.Tensor, positions: torch.Tensor):
        cached = self._angles.get(slot)
        # Identity, not value: the cache holds the tensor, so a hit is the very same positions.
        if cached is None or cached[0] is not positions or cached[1] != x.dtype:
            cached = (positions, x.dtype, *self.rotary(x, positions))
            self._angles[slot] = cached
        return cached[2], cached[3]

    def _positions(self, position_ids: torch.Tensor | None, B: int, T: int, window: int, device) -> torch.Tensor:
        """position_ids (B, T), or 0..T-1 after `window - T` earlier keys (kept for reuse)."""
        if position_ids is not None:
            return position_ids
        cached = self._angles.get("default")
        if cached is None or cached[0] != (B, T, window, device):
            cached = ((B, T, window, device), torch.arange(window - T, window, device=device).expand(B, T))
            self._angles["default"] = cached
        return cached[1]

    def stored_keys(self, new_k: torch.Tensor, position_ids: torch.Tensor | None, window: int) -> torch.Tensor:
        """new_k: (B, Hkv, T, D) the window's rotated keys -> the same keys un-rotated, to store."""
        B, _, T, _ = new_k.shape
        cos, sin = self._cos_sin("stored", new_k, self._positions(position_ids, B, T, window, new_k.device))
        return undo_rotary(new_k, cos, sin)

    def memory_query(self, q: torch.Tensor, position_ids: torch.Tensor | None, window: int) -> torch.Tensor:
        """q: (B, Hq, T, D) rotated queries -> the memory branch's queries, placed by the policy."""
        B, _, T, _ = q.shape
        positions = self._positions(position_ids, B, T, window, q.device)
        cos, sin = self._cos_sin("stored", q, positions)
        q0 = undo_rotary(q, cos, sin)
        if self.policy == "none":
            return q0
        if self.policy == "constant":
            cached = self._angles.get("constant")
            if cached is None or cached[0] != (B, T, q.device):
                cached = ((B, T, q.device), torch.full((B, T), self.distance, device=q.device, dtype=torch.long))
                self._angles["constant"] = cached
            at = cached[1]
        else:  # start: distance from the first key of the local window
            at = positions - positions[:, :1] + (window - T)
        cos, sin = self._cos_sin("read", q, at)
        return apply_rotary(q0, cos, sin)
