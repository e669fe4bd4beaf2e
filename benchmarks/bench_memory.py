"""Add/search throughput and recall@k of every KNNMemory backend, side by side in one run.

    python benchmarks/bench_memory.py                      # full sweep, 4K..1M memories per head
    python benchmarks/bench_memory.py --sizes 4096 65536   # a quick one

Keys are clustered (like real attention keys); recall@k is measured against the `exact` backend
on the same data. The model-sized case times one 512-token segment of SmolLM2-135M
(9 query heads on 3 KV heads, head dim 64) searched against 64K memories in each of its
30 layers, next to the model's own forward time for that segment.
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import machine_info, timed, write_json  # noqa: E402

from knnmem import KNNMemory  # noqa: E402
from knnmem.synthetic import clustered_keys  # noqa: E402

ADD_CHUNK = 4096  # keys per add() call, as a long document streamed in segments


def fill(memory: KNNMemory, keys: torch.Tensor) -> None:
    for start in range(0, keys.shape[2], ADD_CHUNK):
        chunk = keys[:, :, start:start + ADD_CHUNK]
        memory.add(chunk, chunk)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return (found[..., :, None] == truth[..., None, :]).any(-1).float().mean().item()


def sweep(args) -> list[dict]:
    rows = []
    for size in args.sizes:
        g = torch.Generator().manual_seed(size)
        data = clustered_keys(args.heads * (size + args.queries), args.dim, generator=g)
        data = data.reshape(1, args.heads, size + args.queries, args.dim)
        keys, queries = data[:, :, :size], data[:, :, size:]
        truth = None
        for backend in args.backends:
            memory = KNNMemory(1, args.heads, args.dim, size, backend=backend)
            add_s = timed(lambda: fill(memory, keys))
            result = {}
            search_s = timed(lambda: result.update(out=memory.search(queries, args.k)), repeat=args.repeat)
            _, found = result["out"]
            if backend == "exact":
                truth = found
            row = {
                "memories_per_head": size, "backend": memory.backend,
                "add_keys_per_s": args.heads * size / add_s, "add_s": add_s,
                "search_queries_per_s": args.heads * args.queries / search_s, "search_s": search_s,
                f"recall@{args.k}": recall(found, truth) if truth is not None else None,
            }
            rows.append(row)
            print(f"{size:>9} {row['backend']:<28} add {row['add_keys_per_s']:>12,.0f} keys/s"
                  f"  search {row['search_queries_per_s']:>10,.0f} q/s  recall {row[f'recall@{args.k}']}",
                  flush=True)
    return rows


def model_case(args) -> dict:
    """30 layers x (3 KV heads, 64K memories) searched by one 512-token segment (9 query heads)."""
    from knnmem.eval.model import load_model

    model, tokenizer, name = load_model()
    cfg = model.config
    layers, kv_heads, heads = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads
    dim, tokens, size = cfg.hidden_size // heads, 512, 65536
    ids = torch.randint(cfg.vocab_size, (1, tokens))
    with torch.no_grad():
        forward_s = timed(lambda: model(ids), repeat=3)
    g = torch.Generator().manual_seed(0)
    keys = clustered_keys(kv_heads * size, dim, generator=g).reshape(1, kv_heads, size, dim)
    queries = [torch.randn(1, heads, tokens, dim, generator=g) for _ in range(layers)]
    result = {"model": name, "layers": layers, "query_heads": heads, "kv_heads": kv_heads,
              "head_dim": dim, "segment_tokens": tokens, "memories_per_head": size,
              "model_forward_s": forward_s, "search_s_all_layers": {}}
    print(f"model-sized case: {name}, forward of {tokens} tokens {forward_s:.2f} s", flush=True)
    for backend in args.model_backends:
        # One store per backend, searched once per layer with that layer's queries: the same
        # work as 30 stores of the same size (a store per layer would only multiply the RAM).
        memory = KNNMemory(1, kv_heads, dim, size, backend=backend)
        fill(memory, keys)
        seconds = timed(lambda: [memory.search(q, args.k) for q in queries], repeat=2)
        result["search_s_all_layers"][memory.backend] = seconds
        print(f"  {memory.backend:<28} search in all {layers} layers: {seconds:.2f} s "
              f"({seconds / forward_s:.2f}x the forward)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576])
    parser.add_argument("--backends", nargs="+", default=["exact", "flat", "ivf", "hnsw"])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--queries", type=int, default=512, help="queries per head (one segment)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model-backends", nargs="*", default=["exact", "ivf"],
                        help="backends for the model-sized case (none to skip it)")
    parser.add_argument("--out", default="benchmarks/results/memory_cpu.json")
    args = parser.parse_args()
    if "exact" in args.backends:  # the reference for recall comes first
        args.backends = ["exact"] + [b for b in args.backends if b != "exact"]
    payload = {"machine": machine_info(), "parameters": vars(args), "sweep": sweep(args)}
    if args.model_backends:
        payload["model_case"] = model_case(args)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
