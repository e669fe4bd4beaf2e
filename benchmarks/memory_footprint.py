"""What a patched bundled SmolLM2-135M holds in memory after one 8-token forward, at batch 1 and 8.

    python benchmarks/memory_footprint.py [--json benchmarks/results/memory_footprint_cpu.json]

Reports the bytes of every layer's store (`MemoryHandle.stats()["bytes"]`) and the growth of the
process's resident memory, with the default `knnmem.patch` (every layer, 65,536 memories per row
and KV head).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_json  # noqa: E402

import knnmem  # noqa: E402
from knnmem.eval.model import load_model  # noqa: E402


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/memory_footprint_cpu.json")
    args = parser.parse_args()
    model, _, description = load_model()
    rows = {}
    for batch in (1, 8):
        handle = knnmem.patch(model)
        before = resident_bytes()
        with torch.no_grad():
            model(torch.randint(1000, (batch, 8)))
        rows[batch] = {"store_bytes": handle.stats()["bytes"], "resident_growth_bytes": resident_bytes() - before}
        print(f"batch {batch}: stores {rows[batch]['store_bytes'] / 2**20:.1f} MiB, "
              f"process grew {rows[batch]['resident_growth_bytes'] / 2**20:.1f} MiB", flush=True)
        knnmem.unpatch(model)
    write_json(args.json, {"model": description, "tokens": 8, "results": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
