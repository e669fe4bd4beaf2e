"""The two readers side by side on the bundled model: recomputing each window vs the KV-cached
reader (every token through the model once), per configuration, in one run.

    python benchmarks/bench_reader.py [--tokens 4096] [--json benchmarks/results/reader_cpu.json]

Prints and saves tokens/s and perplexity of each (configuration, reader) on the first `--tokens`
tokens of pydoc.py. The perplexities differ where the readers' semantics differ: the cached reader's
context tokens were computed with their own context (Transformer-XL), the recomputing reader's
context sees only the window.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_json  # noqa: E402

import knnmem  # noqa: E402
from knnmem.eval.model import load_model  # noqa: E402
from knnmem.stream import read  # noqa: E402

# name: (local context before each 512-token segment, memory); the cached reader keeps 4 sinks
# (`knnmem.stream.DEFAULT_SINKS`), the recomputing one none (each window starts afresh).
CONFIGS = {"none": (0, False), "xl": (512, False), "long (2048 window)": (1536, False), "xl+memory": (512, True)}
READERS = {"recomputing": dict(cached=False), "cached": dict(cached=True), "cached, no sinks": dict(cached=True, sinks=0)}


def nll_and_seconds(model, ids, context, reader):
    start, nll = time.perf_counter(), []
    for w, logits in read(model, ids[None], 512, context, **reader):
        targets = ids[w.a + 1:w.b + 1]
        nll.append(F.cross_entropy(logits[0, :targets.numel()].float(), targets, reduction="none").double())
    return torch.cat(nll), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--json", default="benchmarks/results/reader_cpu.json")
    args = parser.parse_args()
    import pydoc

    model, tokenizer, description = load_model()
    ids = torch.tensor(tokenizer(open(pydoc.__file__).read()).input_ids[:args.tokens])
    nll_and_seconds(model, ids[:1024], 512, READERS["cached"])  # warm-up: the first forward pays one-time costs
    rows = {}
    for name, (context, memory) in CONFIGS.items():
        handle = knnmem.patch(model, max_memories=16384) if memory else None
        for reader_name, reader in READERS.items():
            if context == 0 and reader_name == "cached, no sinks":
                continue  # no local context: nothing to sink
            if handle is not None:
                handle.reset()
            nll, seconds = nll_and_seconds(model, ids, context, reader)
            key = f"{name} / {reader_name}"
            rows[key] = {"ppl": math.exp(nll.mean().item()), "tokens": nll.numel(), "seconds": seconds,
                         "tokens_per_s": nll.numel() / seconds}
            print(f"{key:45s} ppl {rows[key]['ppl']:8.3f}  {rows[key]['tokens_per_s']:7.1f} tokens/s", flush=True)
        if handle is not None:
            knnmem.unpatch(model)
    write_json(args.json, {"model": description, "document": "pydoc.py", "segment": 512, "configs": CONFIGS,
                           "readers": READERS, "results": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
