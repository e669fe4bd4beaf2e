"""The fused Triton kernel against the PyTorch reference, forward and backward.

Without a GPU this runs in Triton's interpreter (conftest.py), on small shapes that still cover
odd T, an XL window (S > T), k not a power of two, empty slots and all-empty rows, GQA and
key padding, and shapes of several tiles per loop at the library's head dims (64, 128) and decode
(T=1). bf16 is tested on a GPU only (the interpreter's bf16 arithmetic is wrong)."""
import pytest
import torch
import torch.nn.functional as F

from knnmem.functional import knn_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: sums of O(S + k) terms of magnitude ~1 in another order -> ~1e-6; 1e-4 leaves margin for
# exp/log. fp16: inputs and output rounded to fp16 (unit roundoff 4.9e-4) -> a few 1e-3.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}  # bf16: unit roundoff 3.9e-3 -> a few 1e-2
# bf16 runs only on a GPU: the interpreter's bf16 arithmetic is wrong.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def make(B=2, Hq=4, Hkv=2, T=19, S=19, D=16, M=30, topk=5, dtype=torch.float32, seed=0, padding=False):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)  # noqa: E731
    q, k, v = t(B, Hq, T, D), t(B, Hkv, S, D), t(B, Hkv, S, D)
    mem_k = F.normalize(t(B, Hkv, M, D).float(), dim=-1).to(dtype)
    mem_v = t(B, Hkv, M, D)
    idx = torch.randint(-1, M, (B, Hq, T, topk), generator=g)
    idx[0, 1, min(3, T - 1)] = -1  # a query without any memory
    idx[-1, :, 0] = -1  # a whole head-row of empty slots at the first query
    mask = None
    if padding:
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[1, :5] = False  # left padding in row 1
        mask = mask.to(DEVICE)
    gate = torch.randn(Hq, generator=g).to(DEVICE)
    scale = (torch.rand(Hq, generator=g) * 4 + 1).to(DEVICE)
    return q, k, v, mem_k, mem_v, idx.to(DEVICE), gate, scale, mask


def run(backend, inputs, mode, logits, separate_memory_q):
    q, k, v, mem_k, mem_v, idx, gate, scale, mask = (x.clone() if x is not None else None for x in inputs)
    leaves = [x.requires_grad_() for x in (q, k, v, gate, scale)]
    memory_q = (q * 0.5).detach().requires_grad_() if separate_memory_q else None
    out, lse_l, lse_m = knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale, mode=mode, logits=logits,
                                      attention_mask=mask, memory_q=memory_q, return_lse=True, backend=backend)
    g = torch.Generator().manual_seed(9)
    (out.float() * torch.randn(out.shape, generator=g).to(out.device)).sum().backward()
    grads = [x.grad for x in leaves] + ([memory_q.grad] if separate_memory_q else [])
    return [out, lse_l, lse_m], grads


CASES = [  # (mode, logits, S, padding, separate memory query, D)
    ("gate", "normalized", 19, False, False, 16),
    ("joint", "raw", 27, True, True, 32),
    ("gate", "raw", 27, True, False, 16),
    ("joint", "normalized", 19, False, True, 16),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode, logits, S, padding, separate, D", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference_forward_and_backward(mode, logits, S, padding, separate, D, dtype):
    inputs = make(S=S, D=D, dtype=dtype, padding=padding)
    (out_k, *lse_k), grads_k = run("triton", inputs, mode, logits, separate)
    (out_r, *lse_r), grads_r = run("torch", inputs, mode, logits, separate)
    tol = TOL[dtype]
    torch.testing.assert_close(out_k.float(), out_r.float(), **tol)
    for a, b in zip(lse_k, lse_r):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    names = ["dq", "dk", "dv", "dgate", "dmemory_scale", "dmemory_q"]
    for name, a, b in zip(names, grads_k, grads_r):
        if mode == "joint" and name == "dgate" or logits == "raw" and name == "dmemory_scale":
            assert a is None and b is None, name  # unused parameters get no gradient on either path
            continue
        # gradient sums accumulate over T, k and heads: allow 4x the output tolerance
        torch.testing.assert_close(a.float(), b.float(), atol=4 * tol["atol"], rtol=4 * tol["rtol"], msg=name)


@pytest.mark.slow
def test_kernel_with_all_memory_empty_and_topk_1():
    q, k, v, mem_k, mem_v, idx, gate, scale, _ = make(B=1, T=7, S=7, topk=1)
    empty = torch.full_like(idx, -1)
    out = knn_attention(q, k, v, mem_k, mem_v, empty, gate, memory_scale=scale, backend="triton")
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    out1 = knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale, backend="triton")
    ref1 = knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale, backend="torch")
    torch.testing.assert_close(out1, ref1, **TOL[torch.float32])


def test_backend_errors_are_clear(monkeypatch):
    q, k, v, mem_k, mem_v, idx, gate, scale, _ = make(D=12)
    with pytest.raises(ValueError, match="head dim 12 is not a power of two"):
        knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale, backend="cuda")
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        q, k, v, mem_k, mem_v, idx, gate, scale, _ = make()
        with pytest.raises(ValueError, match="not on a CUDA device"):
            knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale, backend="triton")


@pytest.mark.slow
def test_memory_branch_alone_matches_reference():
    from knnmem.functional import memory_attention
    from knnmem.kernels.knn_attention import memory_branch

    q, k, v, mem_k, mem_v, idx, gate, scale, _ = make()
    for logits in ("normalized", "raw"):
        out, lse = memory_branch(q, mem_k, mem_v, idx, scale, 0.25, logits == "normalized")
        ref_out, ref_lse = memory_attention(q, mem_k, mem_v, idx, logits, 0.25, scale)
        torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
        torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])


@pytest.mark.slow
@pytest.mark.parametrize("T, S, topk", [(70, 90, 40), (1, 40, 33)])  # several tiles per loop; decode (T=1)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference_across_tiles(T, S, topk, D, dtype):
    """T and S above the 16-row / 32-key tiles (online-softmax rescaling, loop bounds), top-k above
    the gather block (4 rows at D=64, 2 at D=128), the library's head dims, GQA and padding."""
    inputs = make(B=2, Hq=2, Hkv=1, T=T, S=S, D=D, M=64, topk=topk, dtype=dtype, padding=True)
    (out_k, *lse_k), grads_k = run("triton", inputs, "joint", "normalized", True)
    (out_r, *lse_r), grads_r = run("torch", inputs, "joint", "normalized", True)
    tol = TOL[dtype]
    torch.testing.assert_close(out_k.float(), out_r.float(), **tol)
    for a, b in zip(lse_k, lse_r):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    for name, a, b in zip(["dq", "dk", "dv", "dgate", "dmemory_scale", "dmemory_q"], grads_k, grads_r):
        if name == "dgate":
            continue  # joint mode: no gate gradient on either path (checked above)
        torch.testing.assert_close(a.float(), b.float(), atol=4 * tol["atol"], rtol=4 * tol["rtol"], msg=name)
