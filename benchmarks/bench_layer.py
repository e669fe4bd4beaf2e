"""What a KNNAttention layer costs next to plain sdpa attention, on this machine, side by side.

    python benchmarks/bench_layer.py

One segment of T tokens (SmolLM2-135M-sized layer by default: width 576, 9 query heads on
3 KV heads) through: the same projections + causal sdpa (the baseline), and KNNAttention with a
memory already holding 8K / 64K tokens, with each search backend. The memory's write of the
segment is part of every KNNAttention call, as in use.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import machine_info, timed, write_json  # noqa: E402

from knnmem import KNNAttention  # noqa: E402


def sdpa_layer(layer: KNNAttention, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    q = layer.q_proj(x).view(B, T, layer.heads, -1).transpose(1, 2)
    k = layer.k_proj(x).view(B, T, layer.kv_heads, -1).transpose(1, 2)
    v = layer.v_proj(x).view(B, T, layer.kv_heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--memories", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--backends", nargs="+", default=["exact", "ivf"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/layer_cpu.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.dim)
    rows = []
    with torch.no_grad():
        for size in args.memories:
            for backend in args.backends:
                layer = KNNAttention(args.dim, args.heads, kv_heads=args.kv_heads, topk=args.topk,
                                     max_memories=size, memory_backend=backend)
                for _ in range(size // args.tokens):  # fill the memory to capacity
                    layer(torch.randn(1, args.tokens, args.dim))
                baseline_s = timed(lambda: sdpa_layer(layer, x), repeat=args.repeat)
                knn_s = timed(lambda: layer(x), repeat=args.repeat)
                row = {"memories": size, "backend": layer.memory.backend, "sdpa_layer_ms": 1e3 * baseline_s,
                       "knn_layer_ms": 1e3 * knn_s, "slowdown": knn_s / baseline_s}
                rows.append(row)
                print(f"memory {size:>6}  {row['backend']:<28} sdpa {row['sdpa_layer_ms']:7.2f} ms   "
                      f"knn {row['knn_layer_ms']:8.2f} ms   ({row['slowdown']:.1f}x)", flush=True)
    write_json(args.out, {"machine": machine_info(), "parameters": vars(args), "results": rows})


if __name__ == "__main__":
    main()
