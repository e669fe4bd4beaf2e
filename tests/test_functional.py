import math

import pytest
import torch
import torch.nn.functional as F

from knnmem import KNNMemory
from knnmem.functional import knn_attention


def _inputs(B=2, Hq=4, Hkv=2, T=5, S=5, D=8, M=12, topk=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    mem_k = F.normalize(torch.randn(B, Hkv, M, D, generator=g, dtype=dtype), dim=-1)
    mem_v = torch.randn(B, Hkv, M, D, generator=g, dtype=dtype)
    idx = torch.randint(-1, M, (B, Hq, T, topk), generator=g)
    gate = torch.randn(Hq, generator=g, dtype=dtype)
    scale = torch.rand(Hq, generator=g, dtype=dtype) * 4 + 1
    return q, k, v, mem_k, mem_v, idx, gate, scale


def _sdpa_causal_end_aligned(q, k, v, key_mask=None):
    T, S = q.shape[2], k.shape[2]
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


@pytest.mark.parametrize("mode", ["gate", "joint"])
@pytest.mark.parametrize("logits", ["normalized", "raw"])
def test_empty_memory_equals_causal_sdpa(mode, logits):
    q, k, v, mem_k, mem_v, idx, gate, scale = _inputs()
    empty = torch.full_like(idx, -1)
    out = knn_attention(q, k, v, mem_k, mem_v, empty, gate, memory_scale=scale, mode=mode, logits=logits)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)  # fp32, differently ordered sums


def test_closed_gate_equals_sdpa_with_xl_window_and_padding():
    q, k, v, mem_k, mem_v, idx, _, scale = _inputs(T=4, S=9)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, :3] = False  # row 1: the first three cached keys are padding
    closed = torch.full((4,), -math.inf)
    out = knn_attention(q, k, v, mem_k, mem_v, idx, closed, memory_scale=scale, attention_mask=key_mask)
    torch.testing.assert_close(out, _sdpa_causal_end_aligned(q, k, v, key_mask), atol=1e-6, rtol=1e-5)


def test_open_gate_is_pure_memory_attention():
    q, k, v, mem_k, mem_v, idx, _, scale = _inputs()
    idx[..., 0] = 0  # every query has at least one memory
    out = knn_attention(q, k, v, mem_k, mem_v, idx, torch.full((4,), math.inf), memory_scale=scale)
    # Independent: per query, softmax(scale_h * cos(q, mem_k[idx])) over valid slots.
    expected = torch.empty_like(out)
    for b, h, t in torch.cartesian_prod(torch.arange(2), torch.arange(4), torch.arange(5)).tolist():
        slots = [s for s in idx[b, h, t].tolist() if s >= 0]
        keys, values = mem_k[b, h // 2, slots], mem_v[b, h // 2, slots]
        w = torch.softmax(scale[h] * (keys @ F.normalize(q[b, h, t], dim=0)), dim=0)
        expected[b, h, t] = w @ values
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def _raw_memory_and_window(seed: int, B: int, Hq=4, Hkv=2, T=6, D=8, M=10):
    """A full raw-key store of M memories, a window's q, k, v, and every key/value of both, joined."""
    g = torch.Generator().manual_seed(seed)
    memory = KNNMemory(B, Hkv, D, M, backend="exact", normalize=False)
    old_k, old_v = torch.randn(B, Hkv, M, D, generator=g), torch.randn(B, Hkv, M, D, generator=g)
    memory.add(old_k, old_v)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (Hq, Hkv, Hkv))
    return memory, q, k, v, torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)


def test_joint_raw_with_all_memories_equals_full_attention():
    """joint + raw + exact search + k >= memory size == softmax over [all memory keys; local keys]."""
    T, M = 6, 10
    memory, q, k, v, all_k, all_v = _raw_memory_and_window(4, B=2, T=T, M=M)
    _, idx = memory.search(q, M + 3)  # more than stored: the extra slots are empty (-1)
    out = knn_attention(q, k, v, memory.keys, memory.values, idx, mode="joint", logits="raw")
    allowed = torch.cat([torch.ones(T, M, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], dim=1)
    expected = F.scaled_dot_product_attention(q, all_k, all_v, attn_mask=allowed, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_return_lse_matches_branch_normalisers():
    q, k, v, mem_k, mem_v, idx, gate, scale = _inputs()
    idx[0, 0, 0] = -1  # one query without memory
    _, local_lse, memory_lse = knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale,
                                             return_lse=True)
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8)
    logits = logits.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(local_lse, torch.logsumexp(logits, -1))
    assert torch.isneginf(memory_lse[0, 0, 0]) and torch.isfinite(memory_lse[idx.ge(0).any(-1)]).all()


@pytest.mark.parametrize("mode, logits", [("gate", "normalized"), ("joint", "raw"), ("joint", "normalized")])
def test_gradcheck_float64_and_memory_is_detached(mode, logits):
    q, k, v, mem_k, mem_v, idx, gate, scale = _inputs(B=1, Hq=2, Hkv=1, T=3, S=4, D=4, M=5, topk=3,
                                                      dtype=torch.float64)
    idx[0, 0, 1] = -1  # a query with no memory at all
    params = [x.requires_grad_() for x in (q, k, v, gate, scale)]
    mem_k.requires_grad_()
    mem_v.requires_grad_()

    def fn(q, k, v, gate, scale):
        return knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale, mode=mode, logits=logits)

    assert torch.autograd.gradcheck(fn, params)
    fn(*params).sum().backward()
    assert mem_k.grad is None and mem_v.grad is None
    if mode == "gate":
        assert gate.grad.abs().sum() > 0


def test_fp16_inputs_are_computed_in_fp32():
    q, k, v, mem_k, mem_v, idx, gate, scale = _inputs()
    out32 = knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale)
    out16 = knn_attention(q.half(), k.half(), v.half(), mem_k.half(), mem_v.half(), idx, gate, memory_scale=scale)
    assert out16.dtype == torch.float16
    # Inputs rounded to fp16 (relative error 2^-11) move outputs of magnitude ~1 by ~1e-3.
    torch.testing.assert_close(out16.float(), out32, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(q=torch.randn(2, 4, 5)), ValueError, r"q must have shape \(B, Hq, T, D\)"),
        (dict(q=torch.randn(2, 3, 5, 8)), ValueError, r"multiple of k/v heads"),
        (dict(k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 6, 8)), ValueError, "same shape"),
        (dict(k=torch.randn(2, 2, 3, 8), v=torch.randn(2, 2, 3, 8)), ValueError, "S >= T"),
        (dict(k=torch.randn(2, 2, 5, 8).double(), v=torch.randn(2, 2, 5, 8).double()), TypeError, "match q's dtype"),
        (dict(q=torch.ones(2, 4, 5, 8, dtype=torch.long)), TypeError, "floating-point"),
        (dict(mem_k=torch.randn(2, 3, 12, 8)), ValueError, r"memory_keys must have shape"),
        (dict(idx=torch.zeros(2, 4, 5, 3)), TypeError, "indices must be an int32/int64"),
        (dict(idx=torch.zeros(2, 4, 6, 3, dtype=torch.long)), ValueError, "indices must have shape"),
        (dict(gate=torch.zeros(3)), ValueError, r"gate must be a tensor of shape \(Hq=4,\)"),
        (dict(gate=None), ValueError, "gate .* is required"),
        (dict(scale=None), ValueError, "memory_scale .* is required"),
        (dict(mode="mix"), ValueError, "mode must be one of"),
        (dict(logits="cos"), ValueError, "logits must be one of"),
        (dict(attention_mask=torch.ones(2, 5)), TypeError, "attention_mask must be a bool"),
        (dict(attention_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "attention_mask must have shape"),
    ],
)
def test_bad_input_raises(change, error, match):
    q, k, v, mem_k, mem_v, idx, gate, scale = _inputs()
    args = dict(q=q, k=k, v=v, mem_k=mem_k, mem_v=mem_v, idx=idx, gate=gate, scale=scale,
                mode="gate", logits="normalized", attention_mask=None)
    args.update(change)
    with pytest.raises(error, match=match):
        knn_attention(args["q"], args["k"], args["v"], args["mem_k"], args["mem_v"], args["idx"], args["gate"],
                      memory_scale=args["scale"], mode=args["mode"], logits=args["logits"],
                      attention_mask=args["attention_mask"])


@pytest.mark.parametrize("mode", ["gate", "joint"])
@pytest.mark.parametrize("logits", ["normalized", "raw"])
def test_inference_paths_equal_the_autograd_reference(mode, logits):
    """Without autograd, the CPU paths (fused flash local branch, sparse memory branch) compute the
    same as the materialised reference: GQA, S > T, padding (row 1's first queries see no key),
    empty and repeated memory slots."""
    q, k, v, mem_k, mem_v, idx, gate, scale = _inputs(T=7, S=12, topk=6, M=9)
    idx[0, 1, 2] = torch.tensor([3, 3, -1, 0, 8, 3])  # unsorted, repeated, empty
    idx[1, 0, 0] = -1  # a query with no memory
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, :8] = False  # S - T = 5: row 1's queries 0..2 may attend to nothing
    args = (q, k, v, mem_k, mem_v, idx, gate)
    kwargs = dict(memory_scale=scale, mode=mode, logits=logits, attention_mask=key_mask, return_lse=True)
    with torch.no_grad():
        fast = knn_attention(*args, **kwargs)
    reference = knn_attention(q.clone().requires_grad_(), *args[1:], **kwargs)
    for got, expected in zip(fast, reference):  # fp32, sums in another order
        torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    assert torch.isneginf(fast[1][1, :, :3]).all()  # local lse of the queries that see nothing


@pytest.mark.parametrize("bad", [12, 10**6, -2])
def test_indices_out_of_range_are_refused_not_read_from_another_row(bad):
    """Slot M would be row/head b+1's slot 0 in the flat table: an error, never a silent read."""
    q, k, v, mem_k, mem_v, idx, gate, scale = _inputs(M=12)
    idx[0, 0, 0, 0] = bad
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=r"indices must be slots in \[0, M=12\)"):
            knn_attention(q.requires_grad_(grad), k, v, mem_k, mem_v, idx, gate, memory_scale=scale)


def test_memory_bias_is_a_log_weight_on_every_memory_in_the_joint_softmax():
    """joint + raw + all memories + bias b == full attention with b added to every memory logit."""
    Hq, T, M = 4, 6, 10
    memory, q, k, v, all_k, all_v = _raw_memory_and_window(5, B=1, Hq=Hq, T=T, M=M)
    _, idx = memory.search(q, M)
    for bias in (-3.0, 1.5):
        out = knn_attention(q, k, v, memory.keys, memory.values, idx, mode="joint", logits="raw", memory_bias=bias)
        additive = torch.cat([torch.full((T, M), bias), torch.zeros(T, T).masked_fill(
            ~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)], dim=1)
        expected = F.scaled_dot_product_attention(q, all_k, all_v, attn_mask=additive, enable_gqa=True)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="memory_bias applies to mode='joint' only"):
        knn_attention(q, k, v, memory.keys, memory.values, idx, torch.zeros(Hq), mode="gate", logits="raw",
                      memory_bias=-1.0)
    with pytest.raises(ValueError, match="memory_bias must be a finite number"):
        knn_attention(q, k, v, memory.keys, memory.values, idx, mode="joint", logits="raw", memory_bias=float("nan"))
