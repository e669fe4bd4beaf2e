"""The cost of memory against its local-only twin as a document grows: xl vs xl+memory on the
bundled model (calibrated heads), per memory search backend, in one run.

    python benchmarks/bench_memory_cost.py [--tokens 32768] [--backends auto exact]
                                           [--json benchmarks/results/memory_cost_cpu.json]

Reads the first `--tokens` tokens of `_pydecimal.py` (an eval document) with the cached reader,
512-token segments after a 512-token local context, and prints and saves seconds per 4,096 tokens
read, so that the growth of the search with the memory is visible, and the ratio to `xl`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_json  # noqa: E402

import knnmem  # noqa: E402
from knnmem import corpus  # noqa: E402
from knnmem.eval.model import BUNDLED_CALIBRATION, load_model  # noqa: E402
from knnmem.patch import saved_settings  # noqa: E402
from knnmem.stream import read  # noqa: E402

SEGMENT, CONTEXT, BLOCK = 512, 512, 4096


def seconds_per_block(model, ids: torch.Tensor) -> list[float]:
    """Wall seconds of each successive BLOCK tokens read."""
    times, start, done = [], time.perf_counter(), 0
    for w, _ in read(model, ids[None], SEGMENT, CONTEXT):
        if w.b - done >= BLOCK or w.b == ids.numel():
            now = time.perf_counter()
            times.append(now - start)
            start, done = now, w.b
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--backends", nargs="+", default=["auto", "exact"])
    parser.add_argument("--max-memories", type=int, default=65536)
    parser.add_argument("--json", default="benchmarks/results/memory_cost_cpu.json")
    args = parser.parse_args()
    model, tokenizer, description = load_model()
    document = corpus.stdlib_documents(corpus.EVAL_DOCUMENTS)["code"]
    with open(document, encoding="utf-8") as f:
        ids = torch.tensor(tokenizer(f.read()).input_ids[:args.tokens])
    heads = saved_settings(BUNDLED_CALIBRATION)["heads"]
    seconds_per_block(model, ids[:1024])  # warm-up
    rows = {"xl": seconds_per_block(model, ids)}
    print(f"{'xl':<22}" + " ".join(f"{t:6.1f}" for t in rows["xl"]) + f"   total {sum(rows['xl']):7.1f} s", flush=True)
    for backend in args.backends:
        handle = knnmem.patch(model, heads=heads, max_memories=args.max_memories, memory_backend=backend)
        name = f"xl+memory ({backend})"
        rows[name] = seconds_per_block(model, ids)
        resolved = sorted({m.backend for m in handle.memories.values()})
        knnmem.unpatch(model)
        print(f"{name:<22}" + " ".join(f"{t:6.1f}" for t in rows[name])
              + f"   total {sum(rows[name]):7.1f} s  ({sum(rows[name]) / sum(rows['xl']):.2f}x xl; {resolved})",
              flush=True)
    write_json(args.json, {"model": description, "document": os.path.basename(document), "tokens": ids.numel(),
                           "segment": SEGMENT, "context": CONTEXT, "block": BLOCK, "heads": "calibrated",
                           "max_memories": args.max_memories, "seconds_per_block": rows,
                           "ratio_to_xl": {k: sum(v) / sum(rows["xl"]) for k, v in rows.items()},
                           "machine": machine_info()})


if __name__ == "__main__":
    main()
