"""Fused Triton kernel of `knnmem.functional.knn_attention`: forward and backward.

Forward, one program per (query tile, query head):
  local branch   FlashAttention-style online softmax over the causal window (end-aligned), with an
                 optional (B, S) key-padding mask;
  memory branch  each query's own top-k rows, read by index straight from the store's (B, Hkv, M, D)
                 tensors (no gathered copy), with their own online softmax; -1 = empty slot;
  epilogue       gate (g * memory + (1 - g) * local) or joint (one softmax over both, from the two
                 log-sum-exps); stores out, both log-sum-exps and the two branch outputs.
Backward (memory is detached): per-row coefficients in torch (the gate or joint split of dO),
then one kernel for local dk/dv (looping over the query heads of a GQA group) and one for dq of
both branches (+ per-row memory-scale gradients). Gate gradients are a row reduction in torch.

Shapes: q, memory_q (B, Hq, T, D); k, v (B, Hkv, S, D); memory_keys/values (B, Hkv, M, D);
indices (B, Hq, T, topk) int64. D must be a power of two >= 16. Accumulation is in fp32; fp32
inputs use full-precision dots (not TF32); offsets are int64. Tile sizes keep the gathered rows
within the register file: every launch compiles for sm_90 without spills (`aot.py`).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _program_tile(T, n_heads, group, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's (query tile, query head): batch row b, head h, its KV head's row kv,
    row offsets, which rows exist, and the pointers of the tile's (BLOCK_M, D) block."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: offsets such as (bh * T + m) * D pass 2**31 on big inputs
    b = bh // n_heads
    h = bh % n_heads
    kv = b * (n_heads // group) + h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q_ptrs = (bh * T + offs_m[:, None]) * D + tl.arange(0, D)[None, :]
    return pid_m, bh, b, h, kv, offs_m, row_ok, q_ptrs


@triton.jit
def _local_tile(q, K, V, KPM, b, kv, offs_m, start_n, T, S, scale,
                HAS_KPM: tl.constexpr, DOT: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Local keys/values [start_n, start_n + BLOCK_N), their logits against q, and which pairs may
    attend: in range, causal aligned to the end (key j visible to query i iff j <= i + S - T),
    and not padding."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < S
    ptrs = (kv * S + offs_n[:, None]) * D + tl.arange(0, D)[None, :]
    k = tl.load(K + ptrs, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + ptrs, mask=col_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT).to(tl.float32) * scale
    allowed = col_ok[None, :] & (offs_n[None, :] <= offs_m[:, None] + S - T)
    if HAS_KPM:
        allowed = allowed & (tl.load(KPM + b * S + offs_n, mask=col_ok, other=0) != 0)[None, :]
    return k, v, s, allowed


@triton.jit
def _online_softmax_step(m, l, s):
    """Fold a tile of logits s (-inf = excluded) into the running row max m and sum l.
    Returns (m, l, p, alpha): p the tile's unnormalised probabilities, alpha the factor that
    rescales what was accumulated so far."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    return m_new, l * alpha + tl.sum(p, 1), p, alpha


@triton.jit
def _memory_query(MQ, MSCALE, q_ptrs, row_ok, h, scale, NORMALIZED: tl.constexpr):
    """The memory branch's queries (unit-normalised for normalized logits), the logit scale c,
    and the queries' norms."""
    mq = tl.load(MQ + q_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(mq * mq, 1)), 1e-12)
    if NORMALIZED:
        mq = mq / norm[:, None]
        c = tl.load(MSCALE + h).to(tl.float32)
    else:
        c = scale
    return mq, c, norm


@triton.jit
def _memory_rows(IDX, MK, MV, bh, kv, offs_m, row_ok, start_k, T, M, KTOP,
                 D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Stored key/value rows (BLOCK_M, BLOCK_K, D) at the tile's indices, read in place and kept in
    the store's dtype (half the registers of fp32) until used; -1 = empty. All offsets are int64."""
    offs_k = start_k + tl.arange(0, BLOCK_K)
    idx = tl.load(IDX + (bh * T + offs_m[:, None]) * KTOP + offs_k[None, :],
                  mask=row_ok[:, None] & (offs_k[None, :] < KTOP), other=-1)
    valid = idx >= 0
    ptrs = (kv * M + tl.where(valid, idx, 0))[:, :, None] * D + tl.arange(0, D)[None, None, :]
    kg = tl.load(MK + ptrs, mask=valid[:, :, None], other=0.0)
    vg = tl.load(MV + ptrs, mask=valid[:, :, None], other=0.0)
    return kg, vg, valid


@triton.jit
def _fwd_kernel(Q, K, V, MQ, MK, MV, IDX, KPM, GATE, MSCALE, OUT, OL, OM, LSE_L, LSE_M,
                T, S, M, KTOP, scale, n_heads, group,
                HAS_KPM: tl.constexpr, NORMALIZED: tl.constexpr, JOINT: tl.constexpr, HAS_LOCAL: tl.constexpr,
                DOT: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    pid_m, bh, b, h, kv, offs_m, row_ok, q_ptrs = _program_tile(T, n_heads, group, D, BLOCK_M)
    q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)

    # ---- local branch: causal, end-aligned (key j visible to query i iff j <= i + S - T)
    m_l = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_l = tl.zeros([BLOCK_M], tl.float32)
    acc_l = tl.zeros([BLOCK_M, D], tl.float32)
    hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + S - T) if HAS_LOCAL else 0  # 0: memory branch only
    for start_n in range(0, hi, BLOCK_N):
        k, v, s, allowed = _local_tile(q, K, V, KPM, b, kv, offs_m, start_n, T, S, scale, HAS_KPM, DOT, D, BLOCK_N)
        m_l, l_l, p, alpha = _online_softmax_step(m_l, l_l, tl.where(allowed, s, -float("inf")))
        acc_l = acc_l * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT).to(tl.float32)

    # ---- memory branch: each query's own rows, gathered by index
    mq, c, _ = _memory_query(MQ, MSCALE, q_ptrs, row_ok, h, scale, NORMALIZED)
    m_m = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_m = tl.zeros([BLOCK_M], tl.float32)
    acc_m = tl.zeros([BLOCK_M, D], tl.float32)
    for start_k in range(0, KTOP, BLOCK_K):
        kg, vg, valid = _memory_rows(IDX, MK, MV, bh, kv, offs_m, row_ok, start_k, T, M, KTOP, D, BLOCK_K)
        s = tl.where(valid, tl.sum(mq[:, None, :] * kg.to(tl.float32), 2) * c, -float("inf"))
        m_m, l_m, p, alpha = _online_softmax_step(m_m, l_m, s)
        acc_m = acc_m * alpha[:, None] + tl.sum(p[:, :, None] * vg.to(tl.float32), 1)

    # ---- epilogue: combine
    lse_l = tl.where(l_l > 0, m_l + tl.log(tl.where(l_l > 0, l_l, 1.0)), -float("inf"))
    lse_m = tl.where(l_m > 0, m_m + tl.log(tl.where(l_m > 0, l_m, 1.0)), -float("inf"))
    o_l = acc_l / tl.where(l_l > 0, l_l, 1.0)[:, None]
    o_m = acc_m / tl.where(l_m > 0, l_m, 1.0)[:, None]
    if JOINT:
        mx = tl.maximum(lse_l, lse_m)
        mx_safe = tl.where(mx == -float("inf"), 0.0, mx)
        total = tl.exp(lse_l - mx_safe) + tl.exp(lse_m - mx_safe)  # 0 where the query may attend to nothing
        both = tl.where(total > 0, mx_safe + tl.log(tl.where(total > 0, total, 1.0)), 0.0)
        out = tl.exp(lse_l - both)[:, None] * o_l + tl.exp(lse_m - both)[:, None] * o_m
    else:
        g = tl.sigmoid(tl.load(GATE + h).to(tl.float32))
        out = tl.where((l_m > 0)[:, None], g * o_m + (1.0 - g) * o_l, o_l)
    tl.store(OUT + q_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(OL + q_ptrs, o_l, mask=row_ok[:, None])
    tl.store(OM + q_ptrs, o_m, mask=row_ok[:, None])
    tl.store(LSE_L + bh * T + offs_m, lse_l, mask=row_ok)
    tl.store(LSE_M + bh * T + offs_m, lse_m, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, KPM, LSE, DELTA, A, DK, DV,
                     T, S, scale, n_heads, group,
                     HAS_KPM: tl.constexpr, DOT: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Local dk, dv of one key tile, summed over the query heads of its GQA group.
    P = exp(s - LSE) (the row's normaliser), dS = P * (A * dO . v - DELTA). Dot operands are in the
    inputs' dtype (fp16/bf16 tensor cores; fp32 inputs: exact fp32 dots), accumulation in fp32."""
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // (n_heads // group)
    hkv = bkv % (n_heads // group)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < S
    kv_ptrs = (bkv * S + offs_n[:, None]) * D + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_ptrs, mask=col_ok[:, None], other=0.0)
    col_allowed = col_ok
    if HAS_KPM:
        col_allowed = col_allowed & (tl.load(KPM + b * S + offs_n, mask=col_ok, other=0) != 0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    first = tl.maximum(pid_n * BLOCK_N - (S - T), 0)
    first = (first // BLOCK_M) * BLOCK_M
    for g in range(0, group):
        bh = b * n_heads + hkv * group + g
        for start_m in range(first, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            q_ptrs = (bh * T + offs_m[:, None]) * D + offs_d[None, :]
            q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + q_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
            lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
            a = tl.load(A + bh * T + offs_m, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT).to(tl.float32) * scale
            allowed = row_ok[:, None] & col_allowed[None, :] & (offs_n[None, :] <= offs_m[:, None] + S - T)
            p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
            do_a = (do * a[:, None]).to(q.dtype)
            dv += tl.dot(tl.trans(p.to(q.dtype)), do_a, input_precision=DOT)
            dp = tl.dot(do_a, tl.trans(v), input_precision=DOT)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT) * scale
    tl.store(DK + kv_ptrs, dk, mask=col_ok[:, None])
    tl.store(DV + kv_ptrs, dv, mask=col_ok[:, None])


@triton.jit
def _bwd_dq_kernel(Q, K, V, MQ, MK, MV, IDX, KPM, MSCALE, DO,
                   LSE_L, DELTA_L, A, LSE_M, DELTA_M, BCOEF, DQ, DMQ, DSCALE,
                   T, S, M, KTOP, scale, n_heads, group,
                   HAS_KPM: tl.constexpr, NORMALIZED: tl.constexpr, DOT: tl.constexpr,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dq of the local branch, dmq of the memory branch, and per-row d(memory scale)."""
    pid_m, bh, b, h, kv, offs_m, row_ok, q_ptrs = _program_tile(T, n_heads, group, D, BLOCK_M)
    q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)

    lse = tl.load(LSE_L + bh * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA_L + bh * T + offs_m, mask=row_ok, other=0.0)
    do_a = (do * tl.load(A + bh * T + offs_m, mask=row_ok, other=0.0)[:, None]).to(q.dtype)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + S - T)
    for start_n in range(0, hi, BLOCK_N):
        k, v, s, allowed = _local_tile(q, K, V, KPM, b, kv, offs_m, start_n, T, S, scale, HAS_KPM, DOT, D, BLOCK_N)
        p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do_a, tl.trans(v), input_precision=DOT)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(q.dtype), k, input_precision=DOT) * scale
    tl.store(DQ + q_ptrs, dq, mask=row_ok[:, None])

    mq, c, norm = _memory_query(MQ, MSCALE, q_ptrs, row_ok, h, scale, NORMALIZED)
    lse = tl.load(LSE_M + bh * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA_M + bh * T + offs_m, mask=row_ok, other=0.0)
    do_b = do * tl.load(BCOEF + bh * T + offs_m, mask=row_ok, other=0.0)[:, None]
    u = tl.zeros([BLOCK_M, D], tl.float32)
    dscale = tl.zeros([BLOCK_M], tl.float32)
    for start_k in range(0, KTOP, BLOCK_K):
        kg, vg, valid = _memory_rows(IDX, MK, MV, bh, kv, offs_m, row_ok, start_k, T, M, KTOP, D, BLOCK_K)
        dot = tl.sum(mq[:, None, :] * kg.to(tl.float32), 2)
        p = tl.where(valid, tl.exp(dot * c - lse[:, None]), 0.0)
        dp = tl.sum(do_b[:, None, :] * vg.to(tl.float32), 2)
        ds = p * (dp - delta[:, None])
        u += tl.sum(ds[:, :, None] * kg.to(tl.float32), 1) * c
        dscale += tl.sum(ds * dot, 1)
    if NORMALIZED:  # through mq / |mq|
        u = (u - mq * tl.sum(mq * u, 1)[:, None]) / norm[:, None]
    tl.store(DMQ + q_ptrs, u, mask=row_ok[:, None])
    tl.store(DSCALE + bh * T + offs_m, dscale, mask=row_ok)


# With 4 warps (128 threads), a gathered (BLOCK_M, BLOCK_K, D) memory tile of at most 4096
# elements is 32 per thread per tensor: it fits the register file without spilling (compiled for
# sm_90 by `knnmem.kernels.aot`; tests/test_kernel_compile.py).
_GATHER_ELEMENTS = 4096


def _options(kernel: str, D: int) -> dict:
    """Launch options: 4 warps, 3 stages; at D >= 128 the forward and dq hold more (BLOCK_M, D)
    fp32 tiles and need 8 warps not to spill (dq with 4 warps: 168 registers + 16 B stack on sm_90)."""
    return {"num_warps": 8 if kernel in ("fwd", "dq") and D >= 128 else 4, "num_stages": 3}


def _blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): 16-row query tiles (the smallest tensor-core dot), and a
    memory tile of BLOCK_M x BLOCK_K rows within the register budget."""
    return 16, 32, max(1, _GATHER_ELEMENTS // (16 * D))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: dots in full fp32 ("ieee", as the reference computes, not TF32); fp16/bf16
    operands use tensor cores whatever this says."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _per_head(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A (Hq,) per-head parameter as the kernel reads it: detached fp32, zeros where unused."""
    return x.detach().float().contiguous() if x is not None else like.new_zeros(like.shape[1], dtype=torch.float32)


def _forward(q, k, v, memory_q, memory_keys, memory_values, indices, gate, memory_scale, key_padding,
             scale: float, normalized: bool, joint: bool, has_local: bool = True):
    """Launch `_fwd_kernel` on contiguous inputs. Returns the kernel's inputs as it read them and
    its outputs: (inputs tuple, out, local_out, memory_out, local_lse, memory_lse)."""
    B, Hq, T, D = q.shape
    Hkv, M = memory_keys.shape[1], memory_keys.shape[2]  # k, v have Hkv heads too (validated)
    S, KTOP = k.shape[2], indices.shape[3]
    q, k, v, memory_q = (x.contiguous() for x in (q, k, v, memory_q))
    memory_keys, memory_values = memory_keys.detach().contiguous(), memory_values.detach().contiguous()
    indices = indices.to(torch.int64).contiguous()  # read as int64 by the kernel: no conversion pass
    kpm = key_padding.to(torch.int8).contiguous() if key_padding is not None else q  # unused if None
    gate_t, mscale_t = _per_head(gate, q), _per_head(memory_scale, q)
    out = torch.empty_like(q)
    o_l = torch.empty(B, Hq, T, D, device=q.device, dtype=torch.float32)
    o_m = torch.empty_like(o_l)
    lse_l = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    lse_m = torch.empty_like(lse_l)
    BM, BN, BK = _blocks(D)
    _fwd_kernel[(triton.cdiv(T, BM), B * Hq)](
        q, k, v, memory_q, memory_keys, memory_values, indices, kpm, gate_t, mscale_t,
        out, o_l, o_m, lse_l, lse_m, T, S, M, KTOP, scale, Hq, Hq // Hkv,
        HAS_KPM=key_padding is not None, NORMALIZED=normalized, JOINT=joint, HAS_LOCAL=has_local,
        DOT=_dot_precision(q.dtype), D=D, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **_options("fwd", D))
    inputs = (q, k, v, memory_q, memory_keys, memory_values, indices, kpm, gate_t, mscale_t)
    return inputs, out, o_l, o_m, lse_l, lse_m


class _KNNAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, memory_q, memory_keys, memory_values, indices, gate, memory_scale,
                key_padding, scale, normalized, joint):
        inputs, out, o_l, o_m, lse_l, lse_m = _forward(
            q, k, v, memory_q, memory_keys, memory_values, indices, gate, memory_scale, key_padding,
            scale, normalized, joint)
        ctx.save_for_backward(*inputs, out, o_l, o_m, lse_l, lse_m)
        ctx.has_kpm, ctx.scale, ctx.normalized, ctx.joint = key_padding is not None, scale, normalized, joint
        ctx.gate_dtype = gate.dtype if gate is not None else None
        ctx.mscale_dtype = memory_scale.dtype if memory_scale is not None else None
        return out, lse_l, lse_m

    @staticmethod
    def backward(ctx, d_out, _d_lse_l, _d_lse_m):
        (q, k, v, memory_q, memory_keys, memory_values, indices, kpm, gate_t, mscale_t,
         out, o_l, o_m, lse_l, lse_m) = ctx.saved_tensors
        B, Hq, T, D = q.shape
        Hkv, S, M, KTOP = k.shape[1], k.shape[2], memory_keys.shape[2], indices.shape[3]
        d_out = d_out.contiguous()
        do = d_out.float()
        has_mem = ~torch.isneginf(lse_m)
        inf = torch.tensor(math.inf, device=q.device)
        if ctx.joint:  # one softmax: both branches share the joint normaliser and delta
            both = torch.logaddexp(lse_l, lse_m)
            lse_used_l = lse_used_m = torch.where(torch.isneginf(both), inf, both)
            delta_l = delta_m = (do * out.float()).sum(-1)
            a = b = torch.ones_like(lse_l)
            d_gate = None
        else:
            g = torch.sigmoid(gate_t)[None, :, None]
            a = torch.where(has_mem, 1 - g, torch.ones_like(lse_l))
            b = torch.where(has_mem, g, torch.zeros_like(lse_l))
            lse_used_l = torch.where(torch.isneginf(lse_l), inf, lse_l)
            lse_used_m = torch.where(has_mem, lse_m, inf)
            delta_l = a * (do * o_l).sum(-1)
            delta_m = b * (do * o_m).sum(-1)
            d_gate = ((do * (o_m - o_l)).sum(-1) * has_mem).sum((0, 2)) * (g * (1 - g)).flatten()
        a, b, lse_used_l, lse_used_m, delta_l, delta_m = (
            x.float().contiguous() for x in (a, b, lse_used_l, lse_used_m, delta_l, delta_m))
        dk = torch.empty(B, Hkv, S, D, device=q.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
        dq = torch.empty(B, Hq, T, D, device=q.device, dtype=torch.float32)
        dmq = torch.empty_like(dq)
        dscale = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
        BM, BN, BK = _blocks(D)
        _bwd_dkdv_kernel[(triton.cdiv(S, BN), B * Hkv)](
            q, k, v, d_out, kpm, lse_used_l, delta_l, a, dk, dv, T, S, ctx.scale, Hq, Hq // Hkv,
            HAS_KPM=ctx.has_kpm, DOT=_dot_precision(q.dtype), D=D, BLOCK_M=BM, BLOCK_N=BN, **_options("dkdv", D))
        _bwd_dq_kernel[(triton.cdiv(T, BM), B * Hq)](
            q, k, v, memory_q, memory_keys, memory_values, indices, kpm, mscale_t, d_out,
            lse_used_l, delta_l, a, lse_used_m, delta_m, b, dq, dmq, dscale,
            T, S, M, KTOP, ctx.scale, Hq, Hq // Hkv,
            HAS_KPM=ctx.has_kpm, NORMALIZED=ctx.normalized, DOT=_dot_precision(q.dtype), D=D, BLOCK_M=BM,
            BLOCK_N=BN, BLOCK_K=BK, **_options("dq", D))
        d_mscale = dscale.sum((0, 2)).to(ctx.mscale_dtype) if ctx.normalized and ctx.mscale_dtype else None
        d_gate = d_gate.to(ctx.gate_dtype) if d_gate is not None and ctx.gate_dtype else None
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmq.to(q.dtype), None, None, None,
                d_gate, d_mscale, None, None, None, None)


def fused_knn_attention(q, k, v, memory_q, memory_keys, memory_values, indices, gate, memory_scale,
                        key_padding, scale: float, normalized: bool, joint: bool):
    """Returns (out (B, Hq, T, D), local_lse, memory_lse (B, Hq, T) float32). Inputs are validated
    by `knnmem.functional.knn_attention`; key_padding is None or (B, S) bool."""
    return _KNNAttentionFunction.apply(q, k, v, memory_q, memory_keys, memory_values, indices, gate,
                                       memory_scale, key_padding, scale, normalized, joint)


@torch.no_grad()
def memory_branch(memory_q, memory_keys, memory_values, indices, memory_scale, scale: float, normalized: bool):
    """Forward of the memory branch alone (the same kernel without its local loop), for a
    two-kernel pipeline: returns (out (B, Hq, T, D) float32, lse (B, Hq, T) float32)."""
    # The local inputs are placeholders: with has_local=False the kernel never reads them.
    _, _, _, o_m, _, lse_m = _forward(memory_q, memory_q, memory_q, memory_q, memory_keys, memory_values, indices,
                                      None, memory_scale, None, scale, normalized, joint=True, has_local=False)
    return o_m, lse_m


# ---------------------------------------------------------------- ahead-of-time compile (aot.py)
_KERNELS = {"fwd": _fwd_kernel, "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel}


def launch_flags(every_flag: bool = False) -> dict[str, list[dict]]:
    """Flag sets of each kernel that the launchers above use: all of them, or per kernel its
    heaviest path (plus the memory-branch-only forward)."""
    both = (False, True)
    if every_flag:
        fwd = [dict(HAS_KPM=p, NORMALIZED=n, JOINT=j, HAS_LOCAL=True) for p in both for n in both for j in both]
        fwd += [dict(HAS_KPM=False, NORMALIZED=n, JOINT=True, HAS_LOCAL=False) for n in both]
        return {"fwd": fwd, "dq": [dict(HAS_KPM=p, NORMALIZED=n) for p in both for n in both],
                "dkdv": [dict(HAS_KPM=p) for p in both]}
    return {"fwd": [dict(HAS_KPM=True, NORMALIZED=True, JOINT=True, HAS_LOCAL=True),
                    dict(HAS_KPM=False, NORMALIZED=True, JOINT=True, HAS_LOCAL=False)],
            "dq": [dict(HAS_KPM=True, NORMALIZED=True)], "dkdv": [dict(HAS_KPM=True)]}


def launch_spec(name: str, pointer: str, D: int, **flags):
    """(kernel, argument types, constexprs, options) of a launch with inputs of pointer type
    `pointer` ("*fp16", ...) and head dim D, as the launchers above make it."""
    fn = _KERNELS[name]
    BM, BN, BK = _blocks(D)
    dot = "ieee" if pointer == "*fp32" else "tf32"
    fp32 = {"OL", "OM", "LSE_L", "LSE_M", "GATE", "MSCALE", "LSE", "DELTA", "A", "DK", "DV", "DQ", "DMQ",
            "DSCALE", "DELTA_L", "DELTA_M", "BCOEF"}
    types = {}
    for arg in fn.arg_names:
        if arg in ("T", "S", "M", "KTOP", "n_heads", "group"):
            types[arg] = "i32"
        elif arg == "scale":
            types[arg] = "fp32"
        elif arg == "IDX":
            types[arg] = "*i64"
        elif arg == "KPM":
            types[arg] = "*i8"
        else:
            types[arg] = "*fp32" if arg in fp32 else pointer
    constexprs = {"DOT": dot, "D": D, "BLOCK_M": BM, "BLOCK_N": BN, **flags}
    if "BLOCK_K" in fn.arg_names:
        constexprs["BLOCK_K"] = BK
    return fn, types, constexprs, _options(name, D)
