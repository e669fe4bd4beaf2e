"""Where memory sits and what it returns, measured: xl+memory under each setting, on the calibration
documents (never the eval's), beside its local-only twin xl, in one run.

    python benchmarks/ablate_memory.py [--max-tokens 16384] [--context 512] [--only NAME ...]
        [--json benchmarks/results/ablation_cpu.json]

Every setting starts from the retrofit of the bundled model as it was calibrated (its committed head
calibration, constant distance 512, patch's default top-k, joint softmax, 64 pinned tokens) and changes
what it names (rows name the distance and top-k they use; top-k was 32 when the first rows were run).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_json  # noqa: E402

import knnmem  # noqa: E402
from knnmem.commands.calibrate import calibration_documents  # noqa: E402
from knnmem.eval.model import BUNDLED_CALIBRATION, load_model  # noqa: E402
from knnmem.eval.scoring import score_document  # noqa: E402
from knnmem.patch import saved_settings  # noqa: E402

SETTINGS = {
    "default (calibrated heads, distance 512)": {},
    "every head": {"heads": None},
    "distance 1024 (the local window's far edge)": {"distance": 1024},
    "distance 2048 (beyond the local window)": {"distance": 2048},
    "position start": {"position": "start"},
    "top-8": {"topk": 8},
    "top-128": {"topk": 128},
    "no pinned tokens": {"pinned": 0},
    "distance 2048, top-8": {"distance": 2048, "topk": 8},
    "distance 2048, memory bias -1": {"distance": 2048, "memory_bias": -1.0},
    "distance 2048, memory bias -2": {"distance": 2048, "memory_bias": -2.0},
    "distance 2048, memory bias -4": {"distance": 2048, "memory_bias": -4.0},
    "distance 2048, top-8, neighbours 1": {"distance": 2048, "topk": 8, "neighbours": 1},
    "distance 2048, top-8, neighbours 2": {"distance": 2048, "topk": 8, "neighbours": 2},
    "distance 2048, top-4, neighbours 2": {"distance": 2048, "topk": 4, "neighbours": 2},
    "distance 2048, top-2, neighbours 4": {"distance": 2048, "topk": 2, "neighbours": 4},
    "distance 2048, top-8, query block 8": {"distance": 2048, "topk": 8, "query_block": 8},
    "distance 2048, top-16, query block 8": {"distance": 2048, "topk": 16, "query_block": 8},
    "distance 2048, top-32, query block 16": {"distance": 2048, "topk": 32, "query_block": 16},
    "every head, distance 2048, top-16, query block 8": {"heads": None, "distance": 2048, "topk": 16,
                                                          "query_block": 8},
    "distance 2048, top-8, memory 4096": {"distance": 2048, "topk": 8, "max_memories": 4096},
    "distance 2048, top-8, memory 8192": {"distance": 2048, "topk": 8, "max_memories": 8192},
    "distance 2048, top-8, memory 16384": {"distance": 2048, "topk": 8, "max_memories": 16384},
    "distance 2048, top-8, IVF search": {"distance": 2048, "topk": 8, "memory_backend": "ivf"},
    "distance 2048, top-8, memory 8192, IVF search": {"distance": 2048, "topk": 8, "max_memories": 8192,
                                                      "memory_backend": "ivf"},
}


def perplexity(model, documents, kind: str, context: int | None) -> tuple[list[float], float]:
    """(perplexity per document, seconds) of `kind` over `documents`, with `context` local tokens."""
    start, ppls = time.perf_counter(), []
    for ids in documents:
        if getattr(model, "knnmem", None) is not None:
            model.knnmem.reset()
        ppls.append(math.exp(float(score_document(model, ids, kind, 512, context=context).mean())))
    return ppls, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--only", nargs="*", help="names of SETTINGS to run (default: all)")
    parser.add_argument("--json", default="benchmarks/results/ablation_cpu.json")
    parser.add_argument("--context", type=int, default=None,
                        help="local context of xl and xl+memory (default: one segment, 512 tokens)")
    parser.add_argument("--no-baseline", action="store_true", help="skip xl (already measured in another run)")
    args = parser.parse_args()
    model, tokenizer, description = load_model()
    documents = calibration_documents(tokenizer, None, args.max_tokens)
    tokens = sum(d.numel() - 1 for d in documents)
    calibrated = saved_settings(BUNDLED_CALIBRATION)["heads"]
    rows = {}
    if not args.no_baseline:
        ppls, seconds = perplexity(model, documents, "xl", args.context)
        rows["xl (local only)"] = {"ppl": ppls, "tokens_per_s": tokens / seconds}
        print(f"{'xl (local only)':<46} code {ppls[0]:.3f}  prose {ppls[1]:.3f}  {tokens / seconds:6.1f} tokens/s",
              flush=True)
    for name, change in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        options = {"heads": calibrated, "distance": 512, **change}
        knnmem.patch(model, **options)
        ppls, seconds = perplexity(model, documents, "xl+memory", args.context)
        knnmem.unpatch(model)
        rows[name] = {"ppl": ppls, "tokens_per_s": tokens / seconds, "settings": change}
        print(f"{name:<46} code {ppls[0]:.3f}  prose {ppls[1]:.3f}  {tokens / seconds:6.1f} tokens/s", flush=True)
    write_json(args.json, {"model": description, "documents": ["tkinter/__init__.py (code)",
                           "pydoc_data/topics.py from token 131072 (prose)"], "max_tokens": args.max_tokens,
                           "local_context": 512 if args.context is None else args.context,
                           "calibrated_heads": len(calibrated), "results": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
