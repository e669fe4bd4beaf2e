"""`knnmem eval`: long-document perplexity with and without memory, on the same tokens.

    knnmem eval                                   # bundled SmolLM2-135M, stdlib corpus, defaults
    knnmem eval --data 'docs/**/*.txt' --max-docs 8 --configs none xl+memory
    knnmem eval --configs none xl+memory --memory-sweep 512 1024 2048 4096
    knnmem eval --checkpoint runs/train           # memory configs use a retrofit fine-tuned by knnmem train
    knnmem eval --task recall                     # facts memorised once, asked later (knnmem.eval.recall)
    torchrun --nproc-per-node 2 -m knnmem.eval    # documents split across processes
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..patch import patch, unpatch
from ..positions import POLICIES
from ..search import BACKENDS
from ..stream import windows
from ..train.trainable import TRAINED_FILE, load_trained
from . import corpus
from .model import start_command
from .report import print_table, save_plot, write_json
from .scoring import KINDS, local_context, score_document, uses_memory

TASKS = ("perplexity", "recall")
DEFAULT_CONFIGS = ["none", "xl", "long", "xl+memory"]
# Memory settings a fine-tuned checkpoint fixes (it was trained with them).
CHECKPOINT_SETTINGS = ("memory", "memory_sweep", "pinned", "topk", "layers", "mode", "position", "distance",
                       "memory_backend")
LONG_DOCUMENT = 16384  # default corpus: documents shorter than this (or --max-tokens) are skipped


def parse_layers(text: str) -> list[int] | None:
    """"all", or a comma list of indices and ascending ranges: "22", "15-29", "0,10-12"."""
    if text == "all":
        return None
    layers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or not (hi.isdigit() or hi == ""):
            raise ValueError(f'--layers must be "all" or indices and ranges such as "22", "15-29", "0,10-12"; got {text!r}')
        if hi and int(hi) < int(lo):
            raise ValueError(f"--layers range {part!r} is empty (write the lower index first)")
        layers += list(range(int(lo), int(hi or lo) + 1))
    return layers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnmem eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="perplexity",
                   help="perplexity (this page) or recall (see knnmem eval --task recall --help)")
    p.add_argument("--model", help="local Hugging Face model directory (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data", nargs="+", help="files, directories or globs (default: largest stdlib .py files)")
    p.add_argument("--split", choices=["validation", "train", "all"], default=None,
                   help="documents of the reproducible by-document split to evaluate (default: validation "
                        "for the default corpus, all for --data)")
    p.add_argument("--max-docs", type=int, default=1, help="documents to evaluate (largest first)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens read from each document")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="skip documents shorter than this (default corpus: 16384 or --max-tokens if smaller; "
                        "--data: two segments)")
    p.add_argument("--segment", type=int, default=512, help="tokens per segment")
    p.add_argument("--configs", nargs="+", choices=KINDS, default=DEFAULT_CONFIGS)
    p.add_argument("--memory", type=int, default=65536, help="memory size (tokens per layer and head)")
    p.add_argument("--memory-sweep", type=int, nargs="*", default=[],
                   help="also run each memory config at these sizes (configs NAME@N), for the plot by size")
    p.add_argument("--pinned", type=int, default=None,
                   help="first tokens of each document kept in memory when it overflows "
                        "(default: 64, or half the memory if smaller)")
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--layers", default="all", help='memory layers: "all", "22", "15-29", ...')
    p.add_argument("--mode", choices=["joint", "gate"], default="joint")
    p.add_argument("--position", choices=POLICIES, default="constant")
    p.add_argument("--distance", type=int, default=512, help="distance of --position constant")
    p.add_argument("--memory-backend", choices=("auto",) + BACKENDS, default="auto")
    p.add_argument("--window", type=int, default=2048, help="context window of the `long` configuration")
    p.add_argument("--checkpoint", default=None,
                   help="a `knnmem train` output directory: memory configs run the fine-tuned retrofit "
                        "(its memory settings replace --layers, --mode, --memory, ...)")
    p.add_argument("--json", default="eval_results/eval.json", help="where to write the results")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def check_writable(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory):
        pass


def validate(parser: argparse.ArgumentParser, args) -> None:
    """Every option checked before anything slow starts; errors exit with the option's name."""
    positive = {"--max-docs": args.max_docs, "--max-tokens": args.max_tokens, "--segment": args.segment,
                "--memory": args.memory, "--topk": args.topk, "--window": args.window}
    for name, value in positive.items():
        if value <= 0:
            parser.error(f"{name} must be a positive integer, got {value}")
    if args.max_tokens < 2 * args.segment:
        parser.error(f"--max-tokens ({args.max_tokens}) must hold at least two segments of --segment {args.segment}")
    if args.min_tokens is not None and args.min_tokens < 2:
        parser.error(f"--min-tokens must be at least 2, got {args.min_tokens}")
    if args.window < args.segment:
        parser.error(f"--window ({args.window}) must be at least --segment ({args.segment})")
    if args.distance < 0:
        parser.error(f"--distance must be >= 0, got {args.distance}")
    for size in [args.memory, *args.memory_sweep]:
        if size <= 0:
            parser.error(f"--memory and --memory-sweep sizes must be positive, got {size}")
        if args.pinned is not None and not 0 <= args.pinned < size:
            parser.error(f"--pinned must be in [0, memory size {size}), got {args.pinned}")
    try:
        args.layer_list = parse_layers(args.layers)
    except ValueError as err:
        parser.error(str(err))
    for path in (args.json, args.plot or os.path.splitext(args.json)[0] + ".png"):
        try:
            check_writable(path)
        except OSError as err:
            parser.error(f"cannot write results to {path!r}: {err}")
    if args.split is None:
        args.split = "all" if args.data else "validation"
    if args.checkpoint is not None:
        if not os.path.isfile(os.path.join(args.checkpoint, TRAINED_FILE)):
            parser.error(f"--checkpoint {args.checkpoint!r} holds no {TRAINED_FILE} (a `knnmem train` output)")
        for option in CHECKPOINT_SETTINGS:
            if getattr(args, option) != parser.get_default(option):
                parser.error(f"--{option.replace('_', '-')} comes from --checkpoint; do not give both")


def select_documents(args, tokenizer) -> list[tuple[str, torch.Tensor]]:
    paths = corpus.find_documents(args.data) if args.data else corpus.default_corpus()
    if args.split != "all":
        train, validation = corpus.split(paths)
        paths = validation if args.split == "validation" else train
    min_tokens = args.min_tokens or (2 * args.segment if args.data else min(args.max_tokens, LONG_DOCUMENT))
    documents, short = [], []
    for path in paths:
        ids = tokenizer(corpus.read_text(path), add_special_tokens=False).input_ids
        if len(ids) >= min_tokens:
            documents.append((path, torch.tensor(ids[: args.max_tokens])))
        else:
            short.append(f"{os.path.basename(path)} ({len(ids)})")
        if len(documents) == args.max_docs:
            break
    if not documents:
        raise SystemExit(f"knnmem eval: no document of the {args.split} split has at least {min_tokens} tokens "
                         f"(tokens per document: {', '.join(short[:10]) or 'no documents'})")
    return documents


def configurations(args) -> list[tuple[str, str, int | None]]:
    """(name, kind, memory size) for every configuration to run. With --checkpoint, the memory
    configurations run last, on the fine-tuned retrofit loaded once."""
    configs = []
    for kind in args.configs:
        configs.append((kind, kind, args.memory if uses_memory(kind) else None))
        if uses_memory(kind):
            configs += [(f"{kind}@{n}", kind, n) for n in args.memory_sweep if n != args.memory]
    if args.checkpoint is not None:
        configs.sort(key=lambda c: uses_memory(c[1]))
    return configs


def memory_for(model, args, size: int):
    """Patch `model` for a memory configuration (or load the fine-tuned checkpoint, once)."""
    if args.checkpoint is not None:
        return getattr(model, "knnmem", None) or load_trained(model, args.checkpoint)
    return patch(model, layers=args.layer_list, topk=args.topk, max_memories=size, mode=args.mode,
                 position=args.position, distance=args.distance, memory_backend=args.memory_backend,
                 pinned=args.pinned)


def main(argv: list[str] | None = None) -> dict:
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", choices=TASKS, default="perplexity")
    if task.parse_known_args(argv)[0].task == "recall":
        from .recall import main as recall

        return recall(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    model, tokenizer, description, world, rank = start_command(parser, args.model, args.device)
    n_layers = model.config.num_hidden_layers
    if args.layer_list is not None and not all(0 <= i < n_layers for i in args.layer_list):
        parser.error(f"--layers {args.layers!r}: this model has layers 0..{n_layers - 1}")
    documents = select_documents(args, tokenizer)
    mine = documents[rank::world]
    configs = configurations(args)
    n_positions = math.ceil(args.max_tokens / args.segment)
    segments = sum(len(windows(ids.numel(), args.segment, 0)) for _, ids in mine)
    bar = tqdm(total=segments * len(configs), desc="eval", unit="seg", disable=rank != 0)
    totals = {}
    for name, kind, size in configs:
        bar.set_description(name)
        handle = None
        if uses_memory(kind):
            handle = memory_for(model, args, size)
            size = handle.max_memories
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
        if handle is not None and args.checkpoint is None:
            unpatch(model)
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        totals[name] = (kind, size, sums, float(seconds), handle.settings if handle is not None else None)
    bar.close()
    result = {
        "model": description,
        "documents": [{"name": corpus.display_name(path), "tokens": ids.numel()} for path, ids in documents],
        "world_size": world,
        "settings": {**{k: v for k, v in vars(args).items() if k != "layer_list"},
                     "data": [corpus.display_name(p) for p in args.data] if args.data else None,
                     "checkpoint": corpus.display_name(os.path.normpath(args.checkpoint)) if args.checkpoint else None},
        "configs": {},
    }
    for name, (kind, size, sums, seconds, memory_settings) in totals.items():
        nll, tokens = sums[0].item(), int(sums[1].item())
        counts = sums[2 + n_positions:]
        result["configs"][name] = {
            "kind": kind, "memory": size, "memory_settings": memory_settings, "local_context": local_context(kind, args.segment, args.window),
            "ppl": math.exp(nll / tokens), "nll_sum": nll, "tokens": tokens,
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
