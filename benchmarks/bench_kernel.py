"""Fused knn_attention kernel against its alternatives, forward and backward.

    python benchmarks/bench_kernel.py            # on a CUDA GPU: the full sweep, triton.testing.do_bench
    python benchmarks/bench_kernel.py --quick    # a few points

Candidates, compared in one run on the same inputs (mode="gate", normalized logits):
  fused      the Triton kernel (local + memory + gate in one kernel)
  two_kernel torch sdpa for the local part + the memory-branch kernel + a torch combine (forward)
  reference  the PyTorch reference (gather + einsum + masked softmax)
  sdpa_floor local-only causal sdpa, no memory: the floor
Reported: microseconds; the memory branch's achieved GB/s (it reads topk key and value rows per
query and head) against this device's measured copy bandwidth; TFLOP/s of the local part.
Without a GPU the script says so and times only what a CPU can run (reference and sdpa floor).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import machine_info, write_json  # noqa: E402

from knnmem.functional import knn_attention  # noqa: E402


def inputs(B, Hq, Hkv, T, D, topk, M, dtype, device, requires_grad=False):
    g = torch.Generator(device=device).manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    q, k, v = t(B, Hq, T, D), t(B, Hkv, T, D), t(B, Hkv, T, D)
    mem_k, mem_v = F.normalize(t(B, Hkv, M, D), dim=-1), t(B, Hkv, M, D)
    idx = torch.randint(0, M, (B, Hq, T, topk), generator=g, device=device)
    gate = torch.zeros(Hq, device=device)
    scale = torch.full((Hq,), D**0.5, device=device)
    for x in (q, k, v) if requires_grad else ():
        x.requires_grad_()
    return q, k, v, mem_k, mem_v, idx, gate, scale


def candidates(x, has_gpu):
    q, k, v, mem_k, mem_v, idx, gate, scale = x
    run = lambda backend: lambda: knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale,  # noqa: E731
                                                backend=backend)
    fns = {"reference": run("torch"),
           "sdpa_floor": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
    if has_gpu:
        from knnmem.kernels.knn_attention import memory_branch

        def two_kernel():
            local = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            mem, _ = memory_branch(q, mem_k, mem_v, idx, scale, q.shape[-1] ** -0.5, True)
            g = torch.sigmoid(gate)[None, :, None, None]
            return (g * mem + (1 - g) * local.float()).to(q.dtype)

        fns["fused"] = run("triton")
        fns["two_kernel"] = two_kernel
        fns["memory_branch"] = lambda: memory_branch(q, mem_k, mem_v, idx, scale, q.shape[-1] ** -0.5, True)
    return fns


def measure(fn, has_gpu, repeat=5) -> float:
    """Microseconds: do_bench on a GPU, best of `repeat` on a CPU."""
    if has_gpu:
        from triton.testing import do_bench

        return 1e3 * do_bench(fn)
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1e6 * best


def copy_bandwidth(device) -> float | None:
    """Measured device-to-device copy bandwidth in GB/s (reads + writes), GPU only."""
    if device != "cuda":
        return None
    from triton.testing import do_bench

    x = torch.empty(1 << 28, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    return 2 * x.nbytes / (do_bench(lambda: y.copy_(x)) * 1e-3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/kernel_<device>.json)")
    args = parser.parse_args()
    has_gpu = torch.cuda.is_available()
    device = "cuda" if has_gpu else "cpu"
    if has_gpu:
        grid = dict(T=[512, 2048, 8192], topk=[8, 32, 128, 256], D=[64, 128], heads=[(8, 8), (8, 2)],
                    dtype=[torch.float16, torch.bfloat16])
        if args.quick:
            grid = dict(T=[2048], topk=[32], D=[64], heads=[(8, 8)], dtype=[torch.float16])
    else:
        print("no CUDA GPU: timing only the CPU candidates (reference, sdpa_floor) at small shapes; "
              "the fused and two-kernel paths need a GPU")
        grid = dict(T=[256, 512], topk=[8, 32], D=[64], heads=[(8, 8)], dtype=[torch.float32])
    bandwidth = copy_bandwidth(device)
    rows = []
    for T, topk, D, (Hq, Hkv), dtype in itertools.product(*grid.values()):
        x = inputs(1, Hq, Hkv, T, D, topk, 65536, dtype, device)
        row = {"B": 1, "Hq": Hq, "Hkv": Hkv, "T": T, "topk": topk, "D": D, "dtype": str(dtype)}
        for name, fn in candidates(x, has_gpu).items():
            row[f"{name}_fwd_us"] = measure(fn, has_gpu)
        memory_bytes = Hq * T * topk * 2 * D * x[0].element_size()
        branch_us = row.get("memory_branch_fwd_us")
        if branch_us:
            row["memory_branch_GBps"] = memory_bytes / (branch_us * 1e-6) / 1e9
            row["memory_branch_fraction_of_copy_bw"] = row["memory_branch_GBps"] / bandwidth
        row["local_TFLOPs"] = 2 * Hq * T * T * D / (row["sdpa_floor_fwd_us"] * 1e-6) / 1e12  # causal: half of 4*T*T*D
        xb = inputs(1, Hq, Hkv, T, D, topk, 65536, dtype, device, requires_grad=True)
        for name, backend in (("fused", "triton"), ("reference", "torch")):
            if name == "fused" and not has_gpu:
                continue
            q, k, v, mem_k, mem_v, idx, gate, scale = xb
            out = knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale, backend=backend)
            grad = torch.randn_like(out)
            row[f"{name}_bwd_us"] = measure(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), has_gpu)
        rows.append(row)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    name = torch.cuda.get_device_name().replace(" ", "_") if has_gpu else "cpu"
    out = args.out or f"benchmarks/results/kernel_{name}.json"
    write_json(out, {"machine": machine_info(), "copy_bandwidth_GBps": bandwidth, "parameters": {k: [str(x) for x in v] for k, v in grid.items()}, "results": rows})
    if has_gpu:
        plot(rows, out.replace(".json", ".png"))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"T{r['T']} k{r['topk']} D{r['D']} {r['Hq']}/{r['Hkv']}" for r in rows]
    for name in ("fused", "two_kernel", "reference", "sdpa_floor"):
        ax.plot(range(len(rows)), [r[f"{name}_fwd_us"] for r in rows], marker="o", label=name)
    ax.set(yscale="log", ylabel="forward (us)", title="knn_attention forward")
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
