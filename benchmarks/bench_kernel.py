"""Fused knn_attention kernel against its alternatives, forward and backward.

    python benchmarks/bench_kernel.py            # on a CUDA GPU: the full sweep, triton.testing.do_bench
    python benchmarks/bench_kernel.py --quick    # one point (--grid short: the GPU suite's sweep)

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
import math
import os
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


def kernel_available(device: str) -> bool:
    """The Triton paths run on a CUDA device, or on a CPU in Triton's interpreter (the rehearsal)."""
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def candidates(x, kernel: bool):
    q, k, v, mem_k, mem_v, idx, gate, scale = x
    run = lambda backend: lambda: knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale,  # noqa: E731
                                                backend=backend)
    fns = {"reference": run("torch"),
           "sdpa_floor": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
    if kernel:
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


def measure(fn, device: str, repeat: int = 5) -> float:
    """Microseconds: do_bench on a GPU, best of `repeat` on a CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return 1e3 * do_bench(fn)
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1e6 * best


def copy_bandwidth(device: str) -> float:
    """Measured copy bandwidth of `device` in GB/s (bytes read + written): 1 GiB on a GPU, 16 MiB
    on a CPU."""
    x = torch.empty(1 << 28 if device == "cuda" else 1 << 22, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    return 2 * x.nbytes / (measure(lambda: y.copy_(x), device) * 1e-6) / 1e9


GRIDS = {  # name -> the sweep's axes
    "full": dict(T=[512, 2048, 8192], topk=[8, 32, 128, 256], D=[64, 128], heads=[(8, 8), (8, 2)],
                 dtype=[torch.float16, torch.bfloat16]),
    # the suite's short sweep: the target point (T2048 k32 D64 fp16 8/8) first, then one axis at a time
    "short": [dict(T=2048, topk=32, D=64, heads=(8, 8), dtype=torch.float16),
              *(dict(T=T, topk=32, D=64, heads=(8, 8), dtype=torch.float16) for T in (512, 8192)),
              *(dict(T=2048, topk=k, D=64, heads=(8, 8), dtype=torch.float16) for k in (8, 128)),
              dict(T=2048, topk=32, D=128, heads=(8, 8), dtype=torch.float16),
              dict(T=2048, topk=32, D=64, heads=(8, 2), dtype=torch.bfloat16)],
    "quick": dict(T=[2048], topk=[32], D=[64], heads=[(8, 8)], dtype=[torch.float16]),
    "cpu": dict(T=[256, 512], topk=[8, 32], D=[64], heads=[(8, 8)], dtype=[torch.float32]),
    # the rehearsal: the kernel in Triton's interpreter on a CPU (fp32: the interpreter's bf16 is wrong)
    "tiny": dict(T=[32], topk=[4], D=[16], heads=[(2, 1)], dtype=[torch.float32]),
}


def points(grid) -> list[dict]:
    """The sweep's points: a list as given, or the product of a dict's axes."""
    if isinstance(grid, list):
        return grid
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def bench_point(T: int, topk: int, D: int, heads: tuple[int, int], dtype: torch.dtype, device: str,
                bandwidth: float, memories: int = 65536) -> dict:
    """One row: forward (and backward) microseconds of every candidate at this shape."""
    Hq, Hkv = heads
    kernel = kernel_available(device)
    x = inputs(1, Hq, Hkv, T, D, topk, memories, dtype, device)
    row = {"B": 1, "Hq": Hq, "Hkv": Hkv, "T": T, "topk": topk, "D": D, "dtype": str(dtype), "memories": memories}
    for name, fn in candidates(x, kernel).items():
        row[f"{name}_fwd_us"] = measure(fn, device)
    memory_bytes = Hq * T * topk * 2 * D * x[0].element_size()
    branch_us = row.get("memory_branch_fwd_us")
    if branch_us:
        row["memory_branch_GBps"] = memory_bytes / (branch_us * 1e-6) / 1e9
        row["memory_branch_fraction_of_copy_bw"] = row["memory_branch_GBps"] / bandwidth
        row["fused_over_floor"] = row["fused_fwd_us"] / (row["sdpa_floor_fwd_us"] + branch_us)
        row["fused_speedup_fwd"] = row["reference_fwd_us"] / row["fused_fwd_us"]
    row["local_TFLOPs"] = 2 * Hq * T * T * D / (row["sdpa_floor_fwd_us"] * 1e-6) / 1e12  # causal: half of 4*T*T*D
    xb = inputs(1, Hq, Hkv, T, D, topk, memories, dtype, device, requires_grad=True)
    for name, backend in (("fused", "triton"), ("reference", "torch")):
        if name == "fused" and not kernel:
            continue
        q, k, v, mem_k, mem_v, idx, gate, scale = xb
        out = knn_attention(q, k, v, mem_k, mem_v, idx, gate, memory_scale=scale, backend=backend)
        grad = torch.randn_like(out)
        row[f"{name}_bwd_us"] = measure(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), device)
    if "fused_bwd_us" in row:
        row["fused_speedup_bwd"] = row["reference_bwd_us"] / row["fused_bwd_us"]
    return row


def sweep(grid, device: str, deadline: float = math.inf, memories: int = 65536) -> dict:
    """Every point of `grid` (a GRIDS entry) that starts before `deadline` (time.monotonic())."""
    bandwidth = copy_bandwidth(device)
    rows, skipped = [], 0
    for point in points(grid):
        if time.monotonic() > deadline:
            skipped += 1
            continue
        rows.append(bench_point(**point, device=device, bandwidth=bandwidth, memories=memories))
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    return {"machine": machine_info(), "copy_bandwidth_GBps": bandwidth, "kernel": kernel_available(device),
            "points": [{k: str(v) for k, v in p.items()} for p in points(grid)], "skipped_at_deadline": skipped,
            "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=list(GRIDS), default=None,
                        help="the sweep (default: full on a GPU, cpu without one)")
    parser.add_argument("--quick", action="store_true", help="the same as --grid quick")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/kernel_<device>.json)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid = args.grid or ("quick" if args.quick else "full" if device == "cuda" else "cpu")
    if not kernel_available(device):
        print("no CUDA GPU: timing only the CPU candidates (reference, sdpa_floor); the fused and two-kernel "
              "paths need a GPU (or TRITON_INTERPRET=1, which times the interpreter, not the kernel)")
    result = sweep(GRIDS[grid], device)
    name = torch.cuda.get_device_name().replace(" ", "_") if device == "cuda" else "cpu"
    out = args.out or f"benchmarks/results/kernel_{name}.json"
    write_json(out, {**result, "grid": grid})
    if device == "cuda":
        plot(result["results"], out.replace(".json", ".png"))


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
