"""The paper's table, from scratch: train each configuration with the same budget, in one run,
and report held-out perplexity per byte.

    python benchmarks/paper_table.py                              # CPU scale (minutes per config)
    python benchmarks/paper_table.py --dim 512 --depth 12 --heads 8 --segment 512 --batch-size 16 \
        --steps 20000 --memory-sizes 1536 8192 65536 --device cuda  # the paper's scale, on a GPU

Configurations (Wu et al. 2022, Table 4's rows at a size that fits the budget):
- vanilla: local attention over each segment alone.
- xl: plus a Transformer-XL cache of the previous segment.
- wide: a vanilla model whose window is `--wide` segments (the segment plus a sliding context).
- memory-<N>+xl: XL cache plus one kNN memory layer at 75% depth holding N tokens.

Every model is a `knnmem.MemorizingTransformer` over bytes (vocab 256), trained by
`knnmem.train.train` on long documents (pieces of `--doc-tokens` bytes of the standard
library's largest .py files, train split) read segment by segment with memory cleared per
document, and validated on the held-out split. Prints a table and writes JSON + PNG.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import machine_info, write_json  # noqa: E402

from knnmem import MemorizingConfig, MemorizingTransformer  # noqa: E402
from knnmem import corpus  # noqa: E402
from knnmem.corpus import document_pieces  # noqa: E402
from knnmem.train import TrainSettings, perplexity, train  # noqa: E402

# The paper's numbers for these rows (perplexity, 12-layer models, Table 4 / Figure 1), quoted
# for comparison: vanilla -> XL -> memory 65K + XL.
PAPER = {"arxiv": {"vanilla": 3.29, "xl": 2.67, "memory-65536+xl": 2.31},
         "pg19": {"vanilla": 13.71, "xl": 12.34, "memory-65536+xl": 11.62}}


def utf8_bytes(text: str) -> list[int]:
    """The byte-level tokenizer: UTF-8 bytes (vocab 256)."""
    return list(text.encode("utf-8"))


def configurations(args) -> dict[str, tuple[MemorizingConfig, int]]:
    """name -> (model config, local context of the reader)."""
    base = dict(vocab_size=256, dim=args.dim, depth=args.depth, heads=args.heads, topk=args.topk)
    configs = {
        "vanilla": (MemorizingConfig(**base, memory_layers=[]), 0),
        "xl": (MemorizingConfig(**base, memory_layers=[], xl_cache=True), 0),
        f"wide-{args.wide}x": (MemorizingConfig(**base, memory_layers=[]), (args.wide - 1) * args.segment),
    }
    for size in args.memory_sizes:
        configs[f"memory-{size}+xl"] = (MemorizingConfig(**base, max_memories=size, xl_cache=True), 0)
    return configs


def save_plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(result["configs"])
    left.bar(names, [result["configs"][n]["validation_ppl"] for n in names], color="tab:blue")
    left.set_ylabel("held-out perplexity per byte")
    left.set_ylim(min(c["validation_ppl"] for c in result["configs"].values()) * 0.95)
    left.tick_params(axis="x", rotation=20)
    for name in names:
        history = result["configs"][name]["loss_history"]
        k = max(1, len(history) // 50)
        smooth = [sum(history[i:i + k]) / len(history[i:i + k]) for i in range(0, len(history), k)]
        right.plot([i * k for i in range(len(smooth))], smooth, label=name)
    right.set_xlabel("step")
    right.set_ylabel("training loss (nats per byte)")
    right.legend()
    fig.suptitle(f"From scratch, same budget: {result['settings']['steps']} steps x "
                 f"{result['settings']['batch_size']} x {result['settings']['segment']} bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--segment", type=int, default=128)
    p.add_argument("--wide", type=int, default=4, help="window of the wide vanilla model, in segments")
    p.add_argument("--memory-sizes", type=int, nargs="*", default=[1536, 8192])
    p.add_argument("--configs", nargs="*", default=None, help="names to run (default: all)")
    p.add_argument("--doc-tokens", type=int, default=8192, help="bytes per training/validation document")
    p.add_argument("--max-docs", type=int, default=400)
    p.add_argument("--val-docs", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/paper_table_cpu.json")
    args = p.parse_args()
    train_paths, validation_paths = corpus.split(corpus.training_corpus())
    train_docs = document_pieces(train_paths, utf8_bytes, args.doc_tokens, args.max_docs)
    val_docs = document_pieces(validation_paths, utf8_bytes, args.doc_tokens, args.val_docs)
    configs = configurations(args)
    unknown = set(args.configs or []) - set(configs)
    if unknown:
        p.error(f"--configs: unknown {sorted(unknown)}; choose from {list(configs)}")
    settings = TrainSettings(steps=args.steps, lr=args.lr, lr_memory=None, warmup=args.warmup,
                             batch_size=args.batch_size, segment=args.segment, validate_every=0, save_every=0,
                             seed=args.seed)
    print(f"{len(train_docs)} training / {len(val_docs)} validation documents of {args.doc_tokens} bytes; "
          f"{args.steps} steps of {args.batch_size} x {args.segment} bytes each")
    result = {"machine": machine_info(), "settings": vars(args), "paper": PAPER,
              "documents": {"train": len(train_docs), "validation": len(val_docs)}, "configs": {}}
    for name, (config, context) in configs.items():
        if args.configs and name not in args.configs:
            continue
        torch.manual_seed(args.seed)
        model = MemorizingTransformer(config).to(args.device)
        start = time.perf_counter()
        log = train(model, train_docs, TrainSettings(**{**vars(settings), "context": context}))
        seconds = time.perf_counter() - start
        ppl = perplexity(model, val_docs, args.segment, context, args.batch_size)
        result["configs"][name] = {
            "validation_ppl": ppl, "bits_per_byte": math.log2(ppl), "context": context,
            "memory_layers": config.resolved_memory_layers(),
            "max_memories": config.max_memories if config.resolved_memory_layers() else 0, "xl_cache": config.xl_cache,
            "parameters": sum(p.numel() for p in model.parameters()), "train_tokens": log["tokens"],
            "train_seconds": seconds, "train_tokens_per_s": log["tokens"] / seconds,
            "final_train_loss": sum(log["history"][-20:]) / len(log["history"][-20:]),
            "loss_history": log["history"],
        }
        print(f"{name:>18}: validation ppl {ppl:.4f} ({math.log2(ppl):.4f} bits/byte), {seconds:.0f} s")
        write_json(args.out, result)  # after every configuration: a long run keeps what it finished
    print(f"\n{'config':>18} {'ppl/byte':>9} {'bits/byte':>9} {'train s':>8}")
    for name, c in result["configs"].items():
        print(f"{name:>18} {c['validation_ppl']:9.4f} {c['bits_per_byte']:9.4f} {c['train_seconds']:8.0f}")
    save_plot(result, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
