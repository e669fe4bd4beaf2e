"""`knn_attention`: local causal attention + attention over retrieved memories, combined.

This module is the semantics of the library: the PyTorch reference here is the test oracle of
every other path (the fused Triton kernel in `knnmem.kernels`), and the drop-in layer and the
Hugging Face retrofit both call `knn_attention`.

Each query attends two branches, each with its own softmax:
- local: causal softmax attention over `k, v` (the segment, optionally with a Transformer-XL
  cache prepended); query i of T sees keys j <= i + (S - T) (the causal mask is aligned to the
  end of the window), minus padding.
- memory: softmax over that query's own top-k retrieved memory rows (no positions). Logits are
  `normalized` (cosine of the normalised query with the stored unit keys, times a learned
  per-head `memory_scale`) or `raw` (q . k times `scale`, for stores with normalize=False).
  Empty slots (index -1) are excluded.
The branches are combined by `mode`:
- `gate` (the paper's): out = g * memory + (1 - g) * local, g = sigmoid(gate[h]); a query with
  no memory gets the local output.
- `joint`: one softmax over memory and local keys together, computed exactly from the two
  branches' log-sum-exps: out = w_l * local + w_m * memory, w_x = exp(lse_x - logaddexp(lse_l, lse_m)).

`memory_bias` (joint only) adds one log-weight to every retrieved memory's logit: kNN-LM's
interpolation weight as one softmax; 0 is the plain joint softmax, a negative bias lets memory
win only where it matches clearly better than the local context.

An `extra` memory branch (the knowledge memory: rows retrieved elsewhere and already attended,
given as its (out, lse)) joins the memory branch: with `joint`, one softmax over local, memory
and extra rows; with `gate`, the gated memory branch is one softmax over memory and extra rows.

`knn_attention` checks its arguments; `knn_attention_core` trusts them (callers that checked
once, e.g. the retrofit on every layer and window).
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_dim, check_floating, check_number, check_tensor
from .rows import check_indices, flat_rows, gather_rows

MODES = ("gate", "joint")
LOGITS = ("normalized", "raw")
BACKENDS = ("auto", "torch", "triton")


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim restricted to `allowed`; returns (probs, lse).

    A row with nothing allowed gets all-zero probs and lse = -inf (and finite gradients).
    """
    any_allowed = allowed.any(-1, keepdim=True)
    safe = logits.masked_fill(~allowed, -math.inf).masked_fill(~any_allowed, 0.0)
    lse = torch.logsumexp(safe, dim=-1, keepdim=True)
    probs = torch.exp(safe - lse).masked_fill(~allowed, 0.0)
    return probs, lse.squeeze(-1).masked_fill(~any_allowed.squeeze(-1), -math.inf)


def local_allowed(T: int, S: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean (B|1, 1|H, T, S) mask of the local branch: causal aligned to the end, and padding.

    attention_mask: None; (B, S) bool key-padding mask (True = real token); or a full
    (B, 1|H, T, S) bool mask (True = may attend), which is used as given (it must be causal).
    """
    if attention_mask is not None and attention_mask.ndim == 4:
        return attention_mask
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    allowed = (j <= i + (S - T))[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :]
    return allowed


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _flash_local_cpu(q, k, v, scale: float, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The local branch through torch's fused CPU flash attention, which also returns the lse:
    no (T, S) probability matrix is materialised. Inference only (the op's lse has no gradient)."""
    T, S = q.shape[2], k.shape[2]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    attention_mask = key_padding_from_mask(attention_mask, T, S)  # transformers' 4-D masks, if exact
    if attention_mask is not None and attention_mask.ndim == 2 and bool(attention_mask.all()):
        attention_mask = None  # no padding: the op's own causal path, no mask tensor
    if attention_mask is None and S == T:
        out, lse = flash(q, k, v, 0.0, True, scale=scale)[:2]
        return out, lse
    allowed = local_allowed(T, S, attention_mask, q.device)
    additive = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, -math.inf)
    out, lse = flash(q, k, v, 0.0, False, attn_mask=additive, scale=scale)[:2]
    # The op reports lse 0 (output 0) for a query that may attend to nothing; the semantics say -inf.
    return out, lse.masked_fill(~allowed.any(-1), -math.inf)


def local_attention(q, k, v, scale: float, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention. q: (B, Hq, T, D); k, v: (B, Hkv, S, D) -> (out, lse (B, Hq, T)).

    On a CPU without autograd, through the fused flash op; otherwise the materialised softmax.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if q.device.type == "cpu" and q.dtype == torch.float32 and not _needs_grad(q, k, v):
        return _flash_local_cpu(q, k, v, scale, attention_mask)
    logits = (q @ k.transpose(-1, -2)) * scale
    probs, lse = masked_softmax(logits, local_allowed(q.shape[2], k.shape[2], attention_mask, q.device))
    return probs @ v, lse


def memory_attention(q, memory_keys, memory_values, indices, logits: str, scale: float,
                     memory_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its own retrieved rows.

    q: (B, Hq, T, D); memory_keys/values: (B, Hkv, M, D); indices: (B, Hq, T, k), -1 = empty.
    Returns (out (B, Hq, T, D), lse (B, Hq, T)); memory is detached.
    """
    if not bool((indices >= 0).any()):  # nothing retrieved (e.g. an empty memory): skip the gathers
        return torch.zeros_like(q), torch.full(q.shape[:3], -math.inf, dtype=q.dtype, device=q.device)
    if (q.device.type == "cpu" and memory_keys.dtype == q.dtype == memory_values.dtype
            and not _needs_grad(q, memory_scale)):
        return _memory_attention_sparse(q, memory_keys, memory_values, indices, logits, scale, memory_scale)
    group = q.shape[1] // memory_keys.shape[1]
    # Empty slots get probability 0 in attend_rows, so they need not be zeroed here.
    mem_k = gather_rows(memory_keys.detach(), indices, group, zero_empty=False)
    mem_v = gather_rows(memory_values.detach(), indices, group, zero_empty=False)
    return attend_rows(q, mem_k, mem_v, indices >= 0, logits, scale, memory_scale)


def attend_rows(q, rows_k, rows_v, valid, logits: str, scale: float,
                memory_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its own k rows. q: (B, Hq, T, D); rows_k, rows_v:
    (B, Hq, T, k, D); valid: (B, Hq, T, k) bool. Returns (out (B, Hq, T, D), lse (B, Hq, T))."""
    rows_k, rows_v = rows_k.to(q.dtype), rows_v.to(q.dtype)
    if logits == "normalized":
        scores = torch.einsum("bhtd,bhtkd->bhtk", F.normalize(q, dim=-1), rows_k)
        scores = scores * memory_scale.to(q.dtype)[None, :, None, None]
    else:
        scores = torch.einsum("bhtd,bhtkd->bhtk", q, rows_k) * scale
    probs, lse = masked_softmax(scores, valid)
    return torch.einsum("bhtk,bhtkd->bhtd", probs, rows_v), lse


def _memory_attention_sparse(q, memory_keys, memory_values, indices, logits: str, scale: float,
                             memory_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """`memory_attention` for inference on a CPU, without materialising the (B, Hq, T, k, D)
    gathered rows: the retrieved logits are one sampled matmul (SDDMM) over a block-diagonal
    sparse pattern (query row x stored row), the output one weighted `embedding_bag` of values."""
    B, Hq, T, D = q.shape
    _, H, M, _ = memory_keys.shape
    k = indices.shape[-1]
    rows = flat_rows(indices, H, M, Hq // H).reshape(-1, k)  # (B*Hq*T, k)
    queries = F.normalize(q, dim=-1) if logits == "normalized" else q
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is what we need
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            torch.arange(0, rows.numel() + 1, k, device=q.device), rows.flatten(),
            torch.zeros(rows.numel(), dtype=q.dtype, device=q.device), (rows.shape[0], B * H * M),
            check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern, queries.reshape(-1, D), memory_keys.reshape(-1, D).T,
                                          beta=0.0).values().reshape(B, Hq, T, k)
    if logits == "normalized":
        scores = dots * memory_scale.to(q.dtype)[None, :, None, None]
    else:
        scores = dots * scale
    probs, lse = masked_softmax(scores, indices >= 0)
    out = F.embedding_bag(rows, memory_values.reshape(-1, D), per_sample_weights=probs.reshape(-1, k), mode="sum")
    return out.reshape(B, Hq, T, D), lse


def key_padding_from_mask(mask: torch.Tensor | None, T: int, S: int) -> torch.Tensor | None:
    """Reduce a full (B, 1, T, S) bool mask to a (B, S) key-padding mask when that is exact
    (end-aligned causal & padding, as transformers builds it); otherwise return it unchanged."""
    if mask is None or mask.ndim != 4 or mask.shape[1] != 1:
        return mask
    padding = mask[:, 0].any(dim=1)
    if torch.equal(local_allowed(T, S, padding, mask.device), mask.expand(-1, 1, T, S)):
        return padding
    return mask


def _triton_obstacles(q: torch.Tensor, attention_mask) -> list[str]:
    obstacles = []
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        obstacles.append("the tensors are not on a CUDA device (set TRITON_INTERPRET=1 to run it on a CPU, slowly)")
    D = q.shape[-1]
    if D < 16 or D & (D - 1):
        obstacles.append(f"head dim {D} is not a power of two >= 16")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        obstacles.append(f"dtype {q.dtype} (the kernel takes fp16, bf16, fp32)")
    if attention_mask is not None and attention_mask.ndim == 4:
        obstacles.append("a full 4-D attention_mask that is not causal & key padding")
    try:
        from .kernels import knn_attention  # noqa: F401
    except ImportError as err:
        obstacles.append(f"triton is not importable ({err})")
    return obstacles


def combine(local_out, local_lse, memory_out, memory_lse, mode: str, gate: torch.Tensor | None):
    """Mix the two branches: `gate` (sigmoid per head) or `joint` (one softmax over both)."""
    if mode == "gate":
        g = torch.sigmoid(gate.to(local_out.dtype))[None, :, None, None]
        mixed = g * memory_out + (1 - g) * local_out
        return torch.where(torch.isneginf(memory_lse)[..., None], local_out, mixed)
    both = torch.logaddexp(local_lse, memory_lse)
    both_safe = both.masked_fill(torch.isneginf(both), 0.0)  # a fully masked query: output 0
    return (torch.exp(local_lse - both_safe)[..., None] * local_out
            + torch.exp(memory_lse - both_safe)[..., None] * memory_out)


def _validate(q, k, v, memory_keys, memory_values, indices, gate, memory_scale, mode, logits, attention_mask):
    check_tensor("q", q, 4, "(B, Hq, T, D)")
    check_floating("q", q)
    B, Hq, T, D = q.shape
    for name, x in (("k", k), ("v", v)):
        check_tensor(name, x, 4, "(B, Hkv, S, D)")
        check_floating(name, x)
        if x.dtype != q.dtype or x.device != q.device:
            raise TypeError(f"{name} must match q's dtype and device ({q.dtype}, {q.device}), got ({x.dtype}, {x.device})")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, S, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    doc = f"(B={B}, Hkv, S, D={D})"
    check_dim("k", k, 0, B, doc)
    check_dim("k", k, 3, D, doc)
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if T > S:
        raise ValueError(f"q has T={T} queries but k/v only S={S} keys: S >= T is required (keys end with the queries' own)")
    for name, x in (("memory_keys", memory_keys), ("memory_values", memory_values)):
        doc = f"(B={B}, Hkv={Hkv}, M, D={D})"
        check_tensor(name, x, 4, doc)
        check_floating(name, x)
        check_dim(name, x, 0, B, doc)
        check_dim(name, x, 1, Hkv, doc)
        check_dim(name, x, 3, D, doc)
        if x.device != q.device:
            raise TypeError(f"{name} must be on q's device {q.device}, got {x.device}")
    check_tensor("indices", indices, 4, f"(B={B}, Hq={Hq}, T={T}, k)")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be an int32/int64 tensor, got dtype {indices.dtype}")
    if tuple(indices.shape[:3]) != (B, Hq, T):
        raise ValueError(f"indices must have shape (B={B}, Hq={Hq}, T={T}, k), got {tuple(indices.shape)}")
    if indices.device != q.device:
        raise TypeError(f"indices must be on q's device {q.device}, got {indices.device}")
    check_indices(indices, memory_keys.shape[2])
    check_choice("mode", mode, MODES)
    check_choice("logits", logits, LOGITS)
    for name, x, needed in (("gate", gate, mode == "gate"), ("memory_scale", memory_scale, logits == "normalized")):
        if x is None:
            if needed:
                raise ValueError(f"{name} (a ({Hq},) tensor of per-head values) is required with "
                                 f"{'mode' if name == 'gate' else 'logits'}={mode if name == 'gate' else logits!r}")
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (Hq,):
            raise ValueError(f"{name} must be a tensor of shape (Hq={Hq},), got {getattr(x, 'shape', type(x))}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
            raise TypeError("attention_mask must be a bool tensor, (B, S) or (B, 1|Hq, T, S)")
        ok = (attention_mask.shape == (B, S) or
              (attention_mask.ndim == 4 and attention_mask.shape[0] == B and attention_mask.shape[1] in (1, Hq)
               and tuple(attention_mask.shape[2:]) == (T, S)))
        if not ok:
            raise ValueError(f"attention_mask must have shape (B={B}, S={S}) or (B={B}, 1|{Hq}, T={T}, S={S}), "
                             f"got {tuple(attention_mask.shape)}")


def knn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    indices: torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    memory_scale: torch.Tensor | None = None,
    mode: str = "gate",
    logits: str = "normalized",
    attention_mask: torch.Tensor | None = None,
    memory_q: torch.Tensor | None = None,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    memory_bias: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
):
    """kNN-augmented attention (see the module docstring for the semantics).

    Args:
        q: (B, Hq, T, D) queries of the segment.
        k, v: (B, Hkv, S, D), S >= T: local keys/values, ending with the segment's own.
        memory_keys, memory_values: (B, Hkv, M, D), e.g. `KNNMemory.keys` / `.values` (detached).
        indices: (B, Hq, T, topk) slots from `KNNMemory.search`, -1 = empty.
        gate: (Hq,) gate logits (mode="gate").
        scale: local logit scale, default 1/sqrt(D); also the memory scale for logits="raw".
        memory_scale: (Hq,) per-head scale of normalised memory logits (logits="normalized").
        mode: "gate" or "joint". logits: "normalized" or "raw".
        attention_mask: (B, S) bool key padding, or a full (B, 1|Hq, T, S) bool mask.
        memory_q: (B, Hq, T, D) queries of the memory branch, default q. A rotary model reads its
            un-rotated memory keys with queries placed by a position policy (`knnmem.positions`).
        extra: (out (B, Hq, T, D), lse (B, Hq, T)) of a further memory branch (knowledge), or None.
        memory_bias: log-weight added to every memory logit in mode="joint" (0: none).
        return_lse: also return the local and (whole) memory branch's log-sum-exps (B, Hq, T),
            float32 (-inf = empty).
        backend: "auto" (the fused Triton kernel for CUDA tensors, this PyTorch reference
            otherwise), "torch" or "triton" (raises ValueError where the kernel cannot run).

    Returns:
        out (B, Hq, T, D) in q's dtype, or (out, local_lse, memory_lse) with return_lse.
    """
    _validate(q, k, v, memory_keys, memory_values, indices, gate, memory_scale, mode, logits, attention_mask)
    if memory_q is None:
        memory_q = q
    elif not isinstance(memory_q, torch.Tensor) or memory_q.shape != q.shape or memory_q.dtype != q.dtype:
        raise ValueError(f"memory_q must be a tensor like q {tuple(q.shape)} {q.dtype}, "
                         f"got {getattr(memory_q, 'shape', type(memory_q))}")
    if extra is not None:
        if (not isinstance(extra, tuple) or len(extra) != 2 or not all(isinstance(x, torch.Tensor) for x in extra)
                or extra[0].shape != q.shape or extra[1].shape != q.shape[:3]):
            raise ValueError(f"extra must be (out {tuple(q.shape)}, lse {tuple(q.shape[:3])}) tensors")
    check_choice("backend", backend, BACKENDS)
    check_memory_bias(memory_bias, mode)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return knn_attention_core(q, k, v, memory_keys, memory_values, indices, gate, scale, memory_scale, mode, logits,
                              attention_mask, memory_q, extra, return_lse, backend, memory_bias)


def check_memory_bias(memory_bias: object, mode: str) -> float:
    """A finite log-weight, and only for the joint softmax (a gate already weighs memory)."""
    bias = check_number("memory_bias", memory_bias)
    if bias and mode != "joint":
        raise ValueError(f"memory_bias applies to mode='joint' only, got {bias} with mode={mode!r}")
    return bias


def knn_attention_core(q, k, v, memory_keys, memory_values, indices, gate, scale: float, memory_scale, mode: str,
                       logits: str, attention_mask, memory_q, extra, return_lse: bool, backend: str = "auto",
                       memory_bias: float = 0.0):
    """`knn_attention` on checked arguments (memory_q given, scale resolved): no checks here.
    The kernel runs neither a memory bias nor an extra branch in gate mode: those take the torch path."""
    kernel_can = (extra is None or mode == "joint") and not memory_bias
    if backend == "triton" or (backend == "auto" and q.is_cuda and kernel_can):
        # The kernel takes a (B, S) key-padding mask; transformers hands over full masks.
        kernel_mask = key_padding_from_mask(attention_mask, q.shape[2], k.shape[2])
        obstacles = _triton_obstacles(q, kernel_mask)
        if backend == "triton" and extra is not None and mode == "gate":
            obstacles.append("an extra memory branch in gate mode (the kernel combines it in joint mode only)")
        if backend == "triton" and memory_bias:
            obstacles.append("a memory_bias (not in the kernel yet)")
        if backend == "triton" and obstacles:
            raise ValueError("backend='triton' cannot run here: " + "; ".join(obstacles))
        if not obstacles:
            from .kernels.knn_attention import fused_knn_attention

            out, local_lse, memory_lse = fused_knn_attention(
                q, k, v, memory_q, memory_keys, memory_values, indices, gate, memory_scale, kernel_mask,
                scale, logits == "normalized", mode == "joint")
            if extra is not None:  # joint: the kernel's output is one softmax over local + memory
                both = torch.logaddexp(local_lse, memory_lse)
                out = combine(out.float(), both, extra[0].float(), extra[1].float(), "joint", None).to(q.dtype)
                memory_lse = torch.logaddexp(memory_lse, extra[1].float())
            return (out, local_lse, memory_lse) if return_lse else out
    compute = torch.promote_types(q.dtype, torch.float32)
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    local_out, local_lse = local_attention(qc, kc, vc, scale, attention_mask)
    memory_out, memory_lse = memory_attention(memory_q.to(compute), memory_keys, memory_values, indices.long(), logits, scale,
                                              memory_scale)
    if extra is not None:  # one softmax over both memories' rows
        extra_out, extra_lse = extra[0].to(compute), extra[1].to(compute)
        memory_out = combine(memory_out, memory_lse, extra_out, extra_lse, "joint", None)
        memory_lse = torch.logaddexp(memory_lse, extra_lse)
    if memory_bias:
        memory_lse = memory_lse + memory_bias
    out = combine(local_out, local_lse, memory_out, memory_lse, mode, gate).to(q.dtype)
    if return_lse:
        return out, local_lse.float(), memory_lse.float()
    return out
