"""Which memory settings give the best training-free perplexity? One `knnmem eval` per setting.

    python benchmarks/sweep_memory_settings.py                  # default corpus and sizes
    python benchmarks/sweep_memory_settings.py --data 'texts/*.txt' --out benchmarks/results/sweep_texts.json

Runs the baselines (none, xl, long) once, then the `memory` configuration under each setting
below, all on the same documents and tokens, and writes one JSON with every result.
"""
from __future__ import annotations

import argparse
import json
import os

from knnmem.commands.eval import main as eval_main

SETTINGS = {
    "default (all layers, constant 512, k=32, joint)": [],
    "constant distance 2048": ["--distance", "2048"],
    "position start": ["--position", "start"],
    "position none": ["--position", "none"],
    "constant distance 8192": ["--distance", "8192"],
    "layers 15-29": ["--layers", "15-29"],
    "layer 22 only": ["--layers", "22"],
    "topk 8": ["--topk", "8"],
    "topk 128": ["--topk", "128"],
    "mode gate (untrained, g=0.5)": ["--mode", "gate"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+")
    parser.add_argument("--max-docs", default="3")
    parser.add_argument("--max-tokens", default="4096")
    parser.add_argument("--only", nargs="*", help="names of SETTINGS to run (default: all)")
    parser.add_argument("--out", default="benchmarks/results/sweep_memory_settings.json")
    args = parser.parse_args()
    common = ["--max-docs", args.max_docs, "--max-tokens", args.max_tokens]
    if args.data:
        common += ["--data", *args.data]
    tmp = os.path.splitext(args.out)[0] + "_runs"
    results = {"baselines": eval_main([*common, "--configs", "none", "xl", "long", "--json", f"{tmp}/baselines.json"]),
               "memory": {}}
    for i, (name, extra) in enumerate(SETTINGS.items()):
        if args.only and name not in args.only:
            continue
        run = eval_main([*common, "--configs", "memory", "--memory-sweep", *extra, "--json", f"{tmp}/{i}.json"])
        results["memory"][name] = run["configs"]["memory"]
        print(f"== {name}: ppl {run['configs']['memory']['ppl']:.3f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    base = results["baselines"]["configs"]
    print("\n" + " | ".join(f"{k} {v['ppl']:.3f}" for k, v in base.items()))
    for name, c in results["memory"].items():
        print(f"{name:<52} ppl {c['ppl']:.3f}  ({100 * (c['ppl'] / base['none']['ppl'] - 1):+.1f}% vs none)")


if __name__ == "__main__":
    main()
