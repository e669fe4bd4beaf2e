"""`knnmem eval`: long-document perplexity with and without memory, on the same tokens.

    knnmem eval                                   # bundled SmolLM2-135M, code + prose documents of 32K tokens
    knnmem eval --data 'docs/**/*.txt' --max-docs 8 --configs none xl+memory
    knnmem eval --configs none xl+memory --memory-sweep 512 1024 2048 4096
    knnmem eval --checkpoint runs/train           # memory configs use a retrofit fine-tuned by knnmem train
    knnmem eval --task recall                     # facts memorised once, asked later (knnmem.eval.recall)
    torchrun --nproc-per-node 2 -m knnmem.eval    # documents split across processes
"""
from __future__ import annotations

import argparse
import os

import torch.distributed as dist

from .. import corpus
from ..eval.perplexity import DEFAULT_CONFIGS, DEFAULT_MEMORY, PerplexityRun, evaluate_perplexity, select_documents
from ..handle import DEFAULT_DISTANCE, DEFAULT_NEIGHBOURS, DEFAULT_QUERY_BLOCK, DEFAULT_TOPK
from ..hf import native_context
from ..eval.report import print_row, print_table, save_plot, write_json
from ..eval.scoring import KINDS
from ..positions import POLICIES
from ..search import BACKENDS
from ..train.trainable import TRAINED_FILE, check_trained_fits, read_retrofit
from .common import (HelpFormatter, check_layers, check_non_negative, check_positive, check_results_writable,
                     default_device, memory_heads, parse_layers, start_command)

TASKS = ("perplexity", "recall")
# Memory settings a fine-tuned checkpoint fixes (it was trained with them).
CHECKPOINT_SETTINGS = ("memory", "memory_sweep", "pinned", "topk", "neighbours", "query_block", "layers", "mode",
                       "position", "distance", "memory_backend", "heads")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnmem eval", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--task", choices=TASKS, default="perplexity",
                   help="perplexity (this page) or recall (see knnmem eval --task recall --help)")
    p.add_argument("--model", help="local Hugging Face model directory, or a Hub id in the local cache (default: bundled "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--data", nargs="+",
                   help="files, directories or globs, or 'stdlib' for the largest stdlib .py files (default: "
                        "one code and one prose document of the standard library, " +
                        ", ".join(corpus.EVAL_DOCUMENTS.values()) + ")")
    p.add_argument("--split", choices=["validation", "train", "all"], default=None,
                   help="documents of the reproducible by-document split to evaluate (default: validation "
                        "for --data stdlib, all otherwise)")
    p.add_argument("--max-docs", type=int, default=None,
                   help="documents to evaluate (default: both default documents; 1 with --data)")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens read from each document")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="skip documents shorter than this (default corpus: 16384 or --max-tokens if smaller; "
                        "--data: two segments)")
    p.add_argument("--segment", type=int, default=512, help="tokens per segment")
    p.add_argument("--configs", nargs="+", choices=KINDS, default=DEFAULT_CONFIGS)
    p.add_argument("--memory", type=int, default=DEFAULT_MEMORY,
                   help="memory size (tokens per layer and head; the first --pinned kept, then the most recent)")
    p.add_argument("--memory-sweep", type=int, nargs="*", default=[],
                   help="also run each memory config at these sizes (configs NAME@N), for the plot by size")
    p.add_argument("--pinned", type=int, default=None,
                   help="first tokens of each document kept in memory when it overflows "
                        "(default: 64, or half the memory if smaller)")
    p.add_argument("--topk", type=int, default=DEFAULT_TOPK, help="memories retrieved per query and head")
    p.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS,
                   help="stored tokens read on each side of every retrieved one")
    p.add_argument("--query-block", type=int, default=DEFAULT_QUERY_BLOCK,
                   help="consecutive query positions that share one memory search (by their summed query)")
    p.add_argument("--layers", default="all", help='memory layers: "all", "22", "15-29", ...')
    p.add_argument("--mode", choices=["joint", "gate"], default="joint")
    p.add_argument("--position", choices=POLICIES, default="constant")
    p.add_argument("--distance", type=int, default=DEFAULT_DISTANCE, help="distance of --position constant")
    p.add_argument("--memory-backend", choices=("auto",) + BACKENDS, default="auto")
    p.add_argument("--context", type=int, default=None,
                   help="local context of xl and xl+memory: tokens kept before each segment (default: one segment)")
    p.add_argument("--window", type=int, default=None,
                   help="context window of the `long` configuration (default: the model's native context)")
    p.add_argument("--heads", default="calibrated",
                   help="heads that read memory: 'all', a `knnmem calibrate` output directory, or 'calibrated' "
                        "(default: the committed calibration of the bundled model; every head for other models)")
    p.add_argument("--checkpoint", default=None,
                   help="a `knnmem train` output directory: memory configs run the fine-tuned retrofit "
                        "(its memory settings replace --layers, --mode, --memory, ...)")
    p.add_argument("--json", default="eval_results/eval.json", help="where to write the results")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --json)")
    p.add_argument("--device", default=default_device())
    return p


def plot_path(args) -> str:
    return args.plot or os.path.splitext(args.json)[0] + ".png"


def validate(parser: argparse.ArgumentParser, args) -> None:
    """Every option checked before anything slow starts; errors exit with the option's name."""
    if args.max_docs is None:
        args.max_docs = 1 if args.data else len(corpus.EVAL_DOCUMENTS)
    check_positive(parser, args, "max_docs", "max_tokens", "segment", "memory", "topk", "query_block")
    if args.window is not None and args.window <= 0:
        parser.error(f"--window must be a positive integer, got {args.window}")
    if args.max_tokens < 2 * args.segment:
        parser.error(f"--max-tokens ({args.max_tokens}) must hold at least two segments of --segment {args.segment}")
    if args.min_tokens is not None and args.min_tokens < 2:
        parser.error(f"--min-tokens must be at least 2, got {args.min_tokens}")
    if args.window is not None and args.window < args.segment:
        parser.error(f"--window ({args.window}) must be at least --segment ({args.segment})")
    check_non_negative(parser, args, "context", "distance", "neighbours")
    for size in [args.memory, *args.memory_sweep]:
        if size <= 0:
            parser.error(f"--memory and --memory-sweep sizes must be positive, got {size}")
        if args.pinned is not None and not 0 <= args.pinned < size:
            parser.error(f"--pinned must be in [0, memory size {size}), got {args.pinned}")
    try:
        args.layer_list = parse_layers(args.layers)
    except ValueError as err:
        parser.error(str(err))
    check_results_writable(parser, [args.json, plot_path(args)])
    if args.split is None:
        args.split = "validation" if args.data == ["stdlib"] else "all"
    if args.checkpoint is not None:
        _validate_checkpoint(parser, args)
    args.head_pairs = _heads(parser, args)


def _heads(parser: argparse.ArgumentParser, args) -> list[list[int]] | None:
    """--heads as (layer, head) pairs, None for every head."""
    if args.checkpoint is not None or (args.heads == "calibrated" and args.layer_list is not None):
        return None  # the checkpoint's settings, or memory placed by --layers
    heads = memory_heads(parser, args.heads, args.model)
    if args.layer_list is not None and heads is not None:
        parser.error("--layers and a calibration's --heads both choose where memory is: give --heads all with --layers")
    return heads


def _validate_checkpoint(parser: argparse.ArgumentParser, args) -> None:
    path = os.path.join(args.checkpoint, TRAINED_FILE)
    if not os.path.isfile(path):
        parser.error(f"--checkpoint {args.checkpoint!r} holds no {TRAINED_FILE} (a `knnmem train` output)")
    try:
        _, args.checkpoint_info = read_retrofit(path)
    except ValueError as err:
        parser.error(f"--checkpoint: {err}")
    for option in CHECKPOINT_SETTINGS:
        if getattr(args, option) != parser.get_default(option):
            parser.error(f"--{option.replace('_', '-')} comes from --checkpoint; do not give both")


def run_settings(args) -> PerplexityRun:
    patch_options = dict(pinned=args.pinned, topk=args.topk, neighbours=args.neighbours, query_block=args.query_block,
                         layers=args.layer_list, mode=args.mode, position=args.position, distance=args.distance,
                         memory_backend=args.memory_backend, heads=args.head_pairs)
    return PerplexityRun(
        configs=args.configs, segment=args.segment, window=args.window, context=args.context,
        max_tokens=args.max_tokens, memory=args.memory, memory_sweep=args.memory_sweep,
        patch_options=patch_options, checkpoint=args.checkpoint)


def recorded_settings(args) -> dict:
    """The options as the results record them (no paths of this machine)."""
    return {**corpus.recorded_options(args, ("layer_list", "head_pairs", "checkpoint_info")),
            "data": [corpus.display_name(p) for p in args.data] if args.data else None,
            "checkpoint": corpus.display_name(os.path.normpath(args.checkpoint)) if args.checkpoint else None}


def _task(argv: list[str] | None) -> str:
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", choices=TASKS, default="perplexity")
    return task.parse_known_args(argv)[0].task


def main(argv: list[str] | None = None) -> dict:
    if _task(argv) == "recall":
        from .recall import main as recall

        return recall(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    model, tokenizer, description, world, rank = start_command(parser, args.model, args.device)
    check_layers(parser, args.layers, args.layer_list, model)
    if args.checkpoint is not None:
        try:  # before any configuration runs: a checkpoint of another model fails now, not after them
            check_trained_fits(model, args.checkpoint_info, os.path.join(args.checkpoint, TRAINED_FILE))
        except ValueError as err:
            parser.error(f"--checkpoint: {err}")
    if args.window is None:
        args.window = native_context(model) or 2048
    data = args.data
    if data is None:
        data = list(corpus.stdlib_documents(corpus.EVAL_DOCUMENTS).values())
    elif data == ["stdlib"]:
        data = None  # select_documents: the default corpus
    try:
        documents = select_documents(tokenizer, data, args.split, args.max_docs, args.max_tokens,
                                     args.min_tokens, args.segment)
    except ValueError as err:
        raise SystemExit(f"knnmem eval: {err}") from None

    def report(partial: dict) -> None:  # each configuration's row as it finishes, and the JSON so far
        if rank == 0:
            print_row(partial, list(partial["configs"])[-1])
            write_json(args.json, partial, quiet=True)

    result = evaluate_perplexity(model, description, documents, run_settings(args), recorded_settings(args),
                                 world, rank, on_result=report)
    if rank == 0:
        print_table(result)
        write_json(args.json, result)
        save_plot(result, plot_path(args))
    if world > 1:
        dist.destroy_process_group()
    return result
