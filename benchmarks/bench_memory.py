"""Add/search throughput and recall@k of every KNNMemory backend and of the peer, in one run.

    python benchmarks/bench_memory.py                      # 4K..256K memories per head, 8 heads
    python benchmarks/bench_memory.py --sizes 1048576 --heads 1 --queries 4096 --model-backends \
        --out benchmarks/results/memory_1m_cpu.json       # 1M memories per head

Keys are clustered (like real attention keys: `knnmem.synthetic.clustered_keys`, 1024 clusters);
recall@k is measured against the `exact` backend on the same data. `peer` is the store of
memorizing-transformers-pytorch 0.4.1 (its `KNN` class: faiss HNSWFlat, M=15, default efSearch),
one index per head, fed and searched the same way (`pip install -e ".[bench]"` and
`pip install --no-deps memorizing-transformers-pytorch==0.4.1`; skipped with a message if absent). The model-sized case times one 512-token segment of SmolLM2-135M
(9 query heads on 3 KV heads, head dim 64) searched against 64K memories in each of its
30 layers, next to the model's own forward time for that segment.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import machine_info, timed, write_json  # noqa: E402
from knnmem.corpus import recorded_options  # noqa: E402

from knnmem import KNNMemory  # noqa: E402
from knnmem.synthetic import clustered_keys  # noqa: E402

ADD_CHUNK = 4096  # keys per add() call, as a long document streamed in segments


def fill(memory: KNNMemory, keys: torch.Tensor) -> None:
    for start in range(0, keys.shape[2], ADD_CHUNK):
        chunk = keys[:, :, start:start + ADD_CHUNK]
        memory.add(chunk, chunk)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return (found[..., :, None] == truth[..., None, :]).any(-1).float().mean().item()


class PeerStore:
    """The peer's per-index store (memorizing_transformers_pytorch.knn_memory.KNN), one per head."""

    def __init__(self, heads: int, dim: int, size: int) -> None:
        from memorizing_transformers_pytorch.knn_memory import KNN

        self.knns = [KNN(dim=dim, max_num_entries=size, cap_num_entries=True) for _ in range(heads)]
        self.added = 0
        self.backend = "peer (HNSWFlat M=15)"

    def add(self, keys: torch.Tensor, _values: torch.Tensor) -> None:
        ids = np.arange(self.added, self.added + keys.shape[2])
        for h, knn in enumerate(self.knns):
            knn.add(np.ascontiguousarray(keys[0, h].numpy()), ids=ids)
        self.added += keys.shape[2]

    def search(self, queries: torch.Tensor, k: int):
        found = [knn.search(np.ascontiguousarray(queries[0, h].numpy()), k, increment_age=False)
                 for h, knn in enumerate(self.knns)]
        return None, torch.from_numpy(np.stack(found)).long()[None]


def peer_available() -> bool:
    try:
        import memorizing_transformers_pytorch  # noqa: F401
    except ImportError as err:
        print(f"peer skipped: memorizing-transformers-pytorch is not importable ({err}); "
              "pip install --no-deps memorizing-transformers-pytorch==0.4.1 einops-exts")
        return False
    return True


def parse_spec(spec: str) -> tuple[str, str, torch.dtype | None]:
    """A candidate of --backends: BACKEND[@DEVICE][/DTYPE], e.g. exact, ivf, exact@cuda/float16."""
    rest, _, dtype = spec.partition("/")
    backend, _, device = rest.partition("@")
    if dtype and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise SystemExit(f"--backends: {spec!r}: {dtype!r} is not a torch dtype")
    return backend, device or "cpu", getattr(torch, dtype) if dtype else None


def search_seconds(memory, queries: torch.Tensor, k: int, repeat: int, device: str, result: dict) -> float:
    """Seconds per search: best of `repeat` on a CPU, triton.testing.do_bench on a GPU."""
    call = lambda: result.update(out=memory.search(queries, k))  # noqa: E731
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(call) * 1e-3
    return timed(call, repeat=repeat)


def add_seconds(memory, keys: torch.Tensor, device: str) -> float:
    start = time.perf_counter()
    fill(memory, keys)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def sweep(args, deadline: float = math.inf) -> list[dict]:
    """Every (size, candidate) of args, sizes in order, until `deadline` (time.monotonic())."""
    rows = []
    backends = list(args.backends) + (["peer"] if args.peer and peer_available() else [])
    for size in args.sizes:
        if time.monotonic() > deadline:
            print(f"{size:>9} skipped: past the time budget", flush=True)
            continue
        g = torch.Generator().manual_seed(size)
        data = clustered_keys(args.heads * (size + args.queries), args.dim, generator=g)
        data = data.reshape(1, args.heads, size + args.queries, args.dim)
        keys, queries = data[:, :, :size], data[:, :, size:]
        truth = None
        # The peer stores and searches vectors as given (its layer normalises them): unit vectors for all.
        keys, queries = torch.nn.functional.normalize(keys, dim=-1), torch.nn.functional.normalize(queries, dim=-1)
        for spec in backends:
            backend, device, dtype = parse_spec(spec) if spec != "peer" else ("peer", "cpu", None)
            if backend == "peer":
                memory = PeerStore(args.heads, args.dim, size)
            else:
                memory = KNNMemory(1, args.heads, args.dim, size, backend=backend, device=device, dtype=dtype)
            add_s = add_seconds(memory, keys.to(device), device)
            result = {}
            search_s = search_seconds(memory, queries.to(device), args.k, args.repeat, device, result)
            found = result["out"][1].cpu()
            if truth is None and backend == "exact" and dtype in (None, torch.float32):
                truth = found  # the reference: exact search over float32 keys
            row = {
                "memories_per_head": size, "backend": memory.backend, "spec": spec, "device": device,
                "add_keys_per_s": args.heads * size / add_s, "add_s": add_s,
                "search_queries_per_s": args.heads * args.queries / search_s, "search_s": search_s,
                f"recall@{args.k}": recall(found, truth) if truth is not None else None,
            }
            rows.append(row)
            print(f"{size:>9} {spec:<22} {row['backend']:<28} add {row['add_keys_per_s']:>12,.0f} keys/s"
                  f"  search {row['search_queries_per_s']:>10,.0f} q/s  recall {row[f'recall@{args.k}']}",
                  flush=True)
            del memory
        peer = next((r for r in rows if r["memories_per_head"] == size and r["backend"].startswith("peer")), None)
        if peer is not None:
            for r in rows:
                if r["memories_per_head"] == size and r is not peer:
                    r["search_vs_peer"] = r["search_queries_per_s"] / peer["search_queries_per_s"]
                    r["add_vs_peer"] = r["add_keys_per_s"] / peer["add_keys_per_s"]
                    print(f"{size:>9} {r['backend']:<28} vs peer: search {r['search_vs_peer']:.2f}x, "
                          f"add {r['add_vs_peer']:.1f}x", flush=True)
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
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 65536, 262144])
    parser.add_argument("--backends", nargs="+", default=["exact", "flat", "ivf", "hnsw"],
                        help="candidates, BACKEND[@DEVICE][/DTYPE] (e.g. exact@cuda exact@cuda/float16)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="leave the peer out")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--queries", type=int, default=512, help="queries per head (one segment)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model-backends", nargs="*", default=["exact", "ivf"],
                        help="backends for the model-sized case (none to skip it)")
    parser.add_argument("--out", default="benchmarks/results/memory_cpu.json")
    args = parser.parse_args()
    exact = [b for b in args.backends if parse_spec(b)[0] == "exact" and parse_spec(b)[2] in (None, torch.float32)]
    if exact:  # the reference for recall comes first
        args.backends = exact[:1] + [b for b in args.backends if b != exact[0]]
    payload = {"machine": machine_info(), "parameters": recorded_options(args), "sweep": sweep(args)}
    if args.model_backends:
        payload["model_case"] = model_case(args)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
