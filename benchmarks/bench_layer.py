"""KNNAttention next to plain sdpa attention and next to the peer's layer, side by side in one run.

    python benchmarks/bench_layer.py

The peer is memorizing-transformers-pytorch 0.4.1 (`KNNAttention` with its `KNNMemory`: one
shared key/value head, cosine-similarity logits, one softmax over memory and local keys). The
shape is the peer's: width 512, 8 heads x 64, one KV head, T=512 tokens, top-k 32. Ours is
configured the same way (kv_heads=1, mode="joint", logits="normalized"). Both memories are
filled with `memories` tokens first; every timed call reads memory and then writes its segment,
as in use (capacity leaves room, so neither store evicts or resets while timed). `sdpa` is the
same projections with causal sdpa attention and no memory. Timings: best of --repeat, in one
process, one after the other.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_memory import peer_available  # noqa: E402
from common import machine_info, timed, write_json  # noqa: E402
from knnmem.corpus import recorded_options  # noqa: E402

from knnmem import KNNAttention  # noqa: E402


def sdpa_layer(layer: KNNAttention, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    q = layer.q_proj(x).view(B, T, layer.heads, -1).transpose(1, 2)
    k = layer.k_proj(x).view(B, T, layer.kv_heads, -1).transpose(1, 2)
    v = layer.v_proj(x).view(B, T, layer.kv_heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def peer_layer(args, capacity: int, folder: str):
    from memorizing_transformers_pytorch.knn_memory import KNNMemory as PeerMemory
    from memorizing_transformers_pytorch.memorizing_transformers_pytorch import KNNAttention as PeerAttention

    layer = PeerAttention(dim=args.dim, heads=args.heads, dim_head=args.dim // args.heads,
                          num_retrieved_memories=args.topk)
    memory = PeerMemory(dim=args.dim // args.heads, max_memories=capacity, num_indices=1,
                        memmap_filename=os.path.join(folder, "peer.memmap"), multiprocessing=False)
    return lambda x: layer(x, knn_memory=memory)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--memories", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--backends", nargs="+", default=["auto", "exact"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--out", default="benchmarks/results/layer_cpu.json")
    args = parser.parse_args()
    use_peer = args.peer and peer_available()

    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.dim)
    rows = []
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        for size in args.memories:
            capacity = size + (args.repeat + 2) * args.tokens  # timed calls write, nothing is evicted
            candidates = {}
            for backend in args.backends:
                layer = KNNAttention(args.dim, args.heads, kv_heads=1, topk=args.topk, max_memories=capacity,
                                     mode="joint", logits="normalized", memory_backend=backend)
                candidates[f"knnmem {backend}"] = layer
            if use_peer:
                candidates["peer"] = peer_layer(args, capacity, folder)
            for _ in range(size // args.tokens):  # fill every memory with the same segments
                segment = torch.randn(1, args.tokens, args.dim)
                for run in candidates.values():
                    run(segment)
            some_layer = next(iter(candidates.values()))
            row = {"memories": size, "sdpa_ms": 1e3 * timed(lambda: sdpa_layer(some_layer, x), repeat=args.repeat)}
            for name, run in candidates.items():
                row[f"{name}_ms"] = 1e3 * timed(lambda: run(x), repeat=args.repeat)
                if isinstance(run, KNNAttention):
                    row[f"{name}_store"] = run.memory.backend
            if use_peer:
                for name in candidates:
                    if name != "peer":
                        row[f"{name}_vs_peer"] = row[f"{name}_ms"] / row["peer_ms"]
            rows.append(row)
            print(f"memory {size:>6}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in row.items() if k != "memories"), flush=True)
    write_json(args.out, {"machine": machine_info(), "parameters": recorded_options(args), "results": rows})


if __name__ == "__main__":
    main()
