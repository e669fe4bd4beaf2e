"""`knnmem passkey`: can the model find a key hidden deep in a long text (the standard long-range test)?

    knnmem passkey                                       # 4K and 16K tokens, 3 depths, 2 trials each
    knnmem passkey --lengths 4096 16384 65536 --depths 0.1 0.5 0.9 --trials 4
"""
from __future__ import annotations

import argparse
import os

from .. import corpus
from ..eval import passkey
from ..eval.passkey import CONFIGS, evaluate_configs, plot_passkey, print_passkey
from ..eval.report import write_json
from ..handle import DEFAULT_DISTANCE, DEFAULT_NEIGHBOURS, DEFAULT_QUERY_BLOCK, DEFAULT_TOPK
from ..hf import native_context
from .common import (HelpFormatter, check_non_negative, check_positive, check_results_writable, default_device,
                     finite_float, load_or_exit, memory_heads)

# The help page: the usage lines above, then the task as knnmem.eval.passkey describes it.
DESCRIPTION = __doc__ + "\n" + passkey.__doc__.split("\n\n", 1)[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnmem passkey", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", help="local Hugging Face model directory, or a Hub id in the local cache (default: bundled "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--depths", type=finite_float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--trials", type=int, default=2, help="random keys per (length, depth)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--segment", type=int, default=512)
    p.add_argument("--memory", type=int, default=65536)
    p.add_argument("--topk", type=int, default=DEFAULT_TOPK, help="memories retrieved per query and head")
    p.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS,
                   help="stored tokens read on each side of every retrieved one")
    p.add_argument("--query-block", type=int, default=DEFAULT_QUERY_BLOCK,
                   help="consecutive query positions that share one memory search (by their summed query)")
    p.add_argument("--distance", type=int, default=DEFAULT_DISTANCE, help="where memory keys sit (positions back)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads", default="all",
                   help="heads that read memory: 'all', a `knnmem calibrate` output directory, or 'calibrated' "
                        "(the committed calibration of the bundled model, chosen for perplexity: it loses the "
                        "key, see the README; every head for other models)")
    p.add_argument("--json", default="eval_results/passkey.json")
    p.add_argument("--device", default=default_device())
    return p


def validate(parser: argparse.ArgumentParser, args) -> None:
    check_positive(parser, args, "segment", "memory", "topk", "trials", "query_block")
    check_non_negative(parser, args, "neighbours", "distance")
    if any(n <= args.segment for n in args.lengths):
        parser.error(f"--lengths must all exceed --segment ({args.segment}), got {args.lengths}")
    if any(not 0 <= d <= 1 for d in args.depths):
        parser.error(f"--depths must be fractions in [0, 1], got {args.depths}")
    check_results_writable(parser, [args.json, os.path.splitext(args.json)[0] + ".png"])


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    heads = memory_heads(parser, args.heads, args.model)
    model, tokenizer, description = load_or_exit(parser, args.model, args.device)
    def payload_of(results: dict) -> dict:
        return {"model": description, "settings": corpus.recorded_options(args), "native_context": native_context(model),
                "accuracy": results}

    results = evaluate_configs(model, tokenizer, args.configs, args.lengths, args.depths, args.trials,
                               args.segment, args.seed,
                               on_config=lambda partial: write_json(args.json, payload_of(partial), quiet=True),
                               max_memories=args.memory, topk=args.topk, heads=heads, neighbours=args.neighbours,
                               query_block=args.query_block, distance=args.distance)
    payload = payload_of(results)
    print_passkey(payload)
    write_json(args.json, payload)
    plot_passkey(results, os.path.splitext(args.json)[0] + ".png")
    return payload
