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

import torch
from torch import nn

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


class RotaryPlacement:
    """Un-rotates keys for storage and builds the memory branch's queries, for one model.

    rotary: the model's rotary embedding module, called as rotary(x, position_ids) -> (cos, sin).
    """

    def __init__(self, rotary: nn.Module, policy: str = "constant", distance: int = 512) -> None:
        if policy not in POLICIES:
            raise ValueError(f"position must be one of {POLICIES}, got {policy!r}")
        self.rotary, self.policy, self.distance = rotary, policy, int(distance)

    def split(self, q: torch.Tensor, new_k: torch.Tensor, position_ids: torch.Tensor | None, window: int):
        """q: (B, Hq, T, D) rotated queries; new_k: (B, Hkv, T, D) the segment's rotated keys;
        position_ids: (B, T) or None (then 0..T-1 after `window - T` earlier keys).

        Returns (memory_q (B, Hq, T, D), keys to store (B, Hkv, T, D), un-rotated).
        """
        B, _, T, _ = q.shape
        if position_ids is None:
            position_ids = torch.arange(window - T, window, device=q.device).expand(B, T)
        cos, sin = self.rotary(q, position_ids)
        q0, k0 = undo_rotary(q, cos, sin), undo_rotary(new_k, cos, sin)
        if self.policy == "none":
            return q0, k0
        if self.policy == "constant":
            at = torch.full_like(position_ids, self.distance)
        else:  # start: distance from the first key of the local window
            at = position_ids - position_ids[:, :1] + (window - T)
        cos, sin = self.rotary(q, at)
        return apply_rotary(q0, cos, sin), k0
