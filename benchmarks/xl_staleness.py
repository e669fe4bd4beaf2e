"""Why a Transformer-XL model trains slower than its one-window twin: the cache's staleness or the
gradient the cache does not pass?

    python benchmarks/xl_staleness.py               # 400 steps each, real bytes (about 15 minutes on 2 cores)

An XL model reads a segment exactly as a plain model reads the previous segment and this one in one
window (tests/test_train.py), yet trains slower (benchmarks/results/paper_table_curve.json), while
the plain model over the same two segments ("wide-2x") trains faster than vanilla. Two differences
remain in training, and this script takes them apart, on the same documents in the same order:
- `xl`: the cache holds the previous segment's keys/values as computed one optimizer step ago
  (stale), and passes no gradient.
- `xl-fresh`: before each segment the previous one is read again with the current weights, without
  gradient, into the cache: no staleness, still no gradient through the cache.
- `wide-2x`: the previous segment read again with the current weights, with gradient.
- `vanilla`: the segment alone.
Each configuration: the same model size and schedule as paper_table.py's cpu preset.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import machine_info, write_json  # noqa: E402
from knnmem.corpus import recorded_options  # noqa: E402
from paper_table import utf8_bytes  # noqa: E402

from knnmem import MemorizingConfig, MemorizingTransformer, corpus  # noqa: E402
from knnmem.corpus import document_pieces  # noqa: E402
from knnmem.train import TrainSettings, perplexity  # noqa: E402
from knnmem.train.loop import schedule  # noqa: E402

ARMS = ("vanilla", "xl", "xl-fresh", "wide-2x")


def segment_loss(model, docs: torch.Tensor, a: int, segment: int, arm: str) -> torch.Tensor:
    """Mean cross-entropy of tokens a+1 .. a+segment of `docs` (B, N) under `arm`'s reading."""
    b = min(a + segment, docs.shape[1] - 1)
    targets = docs[:, a + 1:b + 1]
    if arm == "wide-2x":
        logits = model(docs[:, max(0, a - segment):b]).logits[:, -(b - a):]
    elif arm == "xl-fresh":
        model.reset_memory()
        if a:
            with torch.no_grad():
                model(docs[:, a - segment:a])  # the cache, with the current weights
        logits = model(docs[:, a:b]).logits
    else:  # vanilla, or xl with the cache its previous call left
        logits = model(docs[:, a:b]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--segment", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--doc-tokens", type=int, default=8192)
    p.add_argument("--out", default="benchmarks/results/xl_staleness_cpu.json")
    args = p.parse_args()
    train_paths, validation_paths = corpus.split(corpus.training_corpus())
    train_docs = torch.stack(document_pieces(train_paths, utf8_bytes, args.doc_tokens, 400))
    val_docs = document_pieces(validation_paths, utf8_bytes, args.doc_tokens, 8)
    settings = TrainSettings(steps=args.steps, lr=args.lr, warmup=40)
    result = {"machine": machine_info(), "settings": recorded_options(args), "arms": {}}
    for arm in args.arms:
        torch.manual_seed(0)
        model = MemorizingTransformer(MemorizingConfig(vocab_size=256, dim=128, depth=4, heads=4, memory_layers=[],
                                                       xl_cache=arm in ("xl", "xl-fresh")))
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)  # as knnmem.train
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(settings))
        order = torch.randperm(len(train_docs), generator=torch.Generator().manual_seed(0))
        history, step, start = [], 0, time.perf_counter()
        for first in range(0, len(order), args.batch_size):
            docs = train_docs[order[first:first + args.batch_size]]
            model.reset_memory()
            for a in range(0, docs.shape[1] - 1, args.segment):
                loss = segment_loss(model, docs, a, args.segment, arm)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                history.append(loss.item())
                step += 1
                if step == args.steps:
                    break
            if step == args.steps:
                break
        model.reset_memory()
        context = args.segment if arm == "wide-2x" else 0
        ppl = perplexity(model, val_docs, args.segment, context, args.batch_size)
        last = history[-50:]
        result["arms"][arm] = {"validation_ppl": ppl, "train_loss_last_50": sum(last) / len(last),
                               "loss_history": history, "seconds": time.perf_counter() - start}
        print(f"{arm:>9}: validation ppl {ppl:.3f}, last-50 training loss {sum(last) / len(last):.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        write_json(args.out, result)
    print("ln-perplexity gap to vanilla: " + ", ".join(
        f"{a} {math.log(r['validation_ppl'] / result['arms']['vanilla']['validation_ppl']):+.3f}"
        for a, r in result["arms"].items() if "vanilla" in result["arms"]))


if __name__ == "__main__":
    main()
