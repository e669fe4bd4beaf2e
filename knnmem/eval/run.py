"""`knnmem eval`: long-document perplexity with and without memory, on the same tokens.

    knnmem eval                                   # bundled SmolLM2-135M, stdlib corpus, defaults
    knnmem eval --data 'docs/**/*.txt' --max-docs 8 --configs none memory
    torchrun --nproc-per-node 2 -m knnmem.eval    # documents split across processes
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..patch import patch, unpatch
from ..positions import POLICIES
from . import corpus
from .model import load_model
from .report import print_table, save_plot, write_json
from .scoring import KINDS, score_document, segment_bounds


def parse_layers(text: str, n_layers: int) -> list[int] | None:
    """"all", or a comma list of indices and ranges: "22", "15-29", "0,10-12"."""
    if text == "all":
        return None
    layers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        layers += list(range(int(lo), int(hi or lo) + 1))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise SystemExit(f"--layers: {bad} not in [0, {n_layers})")
    return layers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnmem eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Hugging Face model directory (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data", nargs="+", help="files, directories or globs (default: largest stdlib .py files)")
    p.add_argument("--split", choices=["validation", "train", "all"], default="validation",
                   help="documents of the reproducible by-document split to evaluate (default: validation)")
    p.add_argument("--max-docs", type=int, default=3, help="documents to evaluate (largest first)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens read from each document")
    p.add_argument("--segment", type=int, default=512, help="tokens per segment")
    p.add_argument("--configs", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--memory", type=int, default=65536, help="memory size (tokens per layer and head)")
    p.add_argument("--memory-sweep", type=int, nargs="*", default=[512, 1024, 2048],
                   help="also run `memory` at these sizes (configs memory@N) for the plot by memory size")
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--layers", default="all", help='memory layers: "all", "22", "15-29", ...')
    p.add_argument("--mode", choices=["joint", "gate"], default="joint")
    p.add_argument("--position", choices=POLICIES, default="constant")
    p.add_argument("--distance", type=int, default=512, help="distance of --position constant")
    p.add_argument("--memory-backend", default="auto")
    p.add_argument("--window", type=int, default=2048, help="context window of the `long` configuration")
    p.add_argument("--json", default="eval_results/eval.json", help="where to write the results")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def select_documents(args, tokenizer) -> list[tuple[str, torch.Tensor]]:
    paths = corpus.find_documents(args.data) if args.data else corpus.default_corpus()
    if args.split != "all":
        train, validation = corpus.split(paths)
        paths = validation if args.split == "validation" else train
    documents = []
    for path in paths:
        ids = tokenizer(corpus.read_text(path), add_special_tokens=False).input_ids[: args.max_tokens]
        if len(ids) >= 2 * args.segment:  # at least one earlier segment to remember
            documents.append((path, torch.tensor(ids)))
        if len(documents) == args.max_docs:
            break
    if not documents:
        raise SystemExit(f"no document of at least {2 * args.segment} tokens in the {args.split} split")
    return documents


def configurations(args) -> list[tuple[str, str, int | None]]:
    """(name, kind, memory size) for every configuration to run."""
    configs = [(kind, kind, args.memory if kind == "memory" else None) for kind in args.configs]
    if "memory" in args.configs:
        configs += [(f"memory@{n}", "memory", n) for n in args.memory_sweep if n != args.memory]
    return configs


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model, tokenizer, description = load_model(args.model, device=args.device)
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    documents = select_documents(args, tokenizer)
    mine = documents[rank::world]
    configs = configurations(args)
    n_positions = math.ceil(args.max_tokens / args.segment)
    segments = sum(len(segment_bounds(ids.numel(), args.segment)) for _, ids in mine)
    bar = tqdm(total=segments * len(configs), desc="eval", unit="seg", disable=rank != 0)
    totals = {}
    for name, kind, size in configs:
        bar.set_description(name)
        handle = None
        if kind == "memory":
            handle = patch(model, layers=layers, topk=args.topk, max_memories=size, mode=args.mode,
                           position=args.position, distance=args.distance, memory_backend=args.memory_backend)
        # nll sum, tokens, per-segment-index nll sums and token counts (for the plot), seconds
        sums = torch.zeros(2 + 2 * n_positions, dtype=torch.float64)
        start = time.perf_counter()
        for _, ids in mine:
            if handle is not None:
                handle.reset()
            nll = score_document(model, ids, kind, args.segment, args.window, on_segment=lambda: bar.update())
            sums[0] += nll.sum()
            sums[1] += nll.numel()
            for index, chunk in enumerate(nll.split(args.segment)):
                sums[2 + index] += chunk.sum()
                sums[2 + n_positions + index] += chunk.numel()
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if handle is not None:
            unpatch(model)
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        totals[name] = (kind, size, sums, float(seconds))
    bar.close()
    result = {
        "model": description,
        "documents": [{"path": path, "tokens": ids.numel()} for path, ids in documents],
        "world_size": world,
        "settings": vars(args),
        "configs": {},
    }
    for name, (kind, size, sums, seconds) in totals.items():
        nll, tokens = sums[0].item(), int(sums[1].item())
        counts = sums[2 + n_positions:]
        result["configs"][name] = {
            "kind": kind, "memory": size, "ppl": math.exp(nll / tokens), "nll_sum": nll, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds,
            "ppl_by_segment": [math.exp(s / c) for s, c in zip(sums[2:2 + n_positions].tolist(), counts.tolist()) if c],
        }
    if rank == 0:
        print_table(result)
        write_json(args.json, result)
        save_plot(result, args.plot or os.path.splitext(args.json)[0] + ".png")
    if world > 1:
        dist.destroy_process_group()
    return result
