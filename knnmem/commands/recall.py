"""`knnmem eval --task recall`: facts read once, asked later without them in the prompt.

    knnmem eval --task recall                                  # 3 x 96 facts, every configuration
    knnmem eval --task recall --facts 32 --families unicode --configs none prompt knowledge-fp16
"""
from __future__ import annotations

import argparse
import os

from .. import corpus
from ..eval import recall
from ..eval.recall import (CONFIGS, DEFAULT_FAMILIES, FAMILIES, RecallRun, all_facts, evaluate_recall,
                           memorised_tokens, plot_recall, print_recall, questions)
from ..eval.report import write_json
from ..knowledge import Storage
from .common import (HelpFormatter, check_layers, check_positive, check_results_writable, default_device, finite_float,
                     load_or_exit, parse_layers)

# The help page: the usage lines above, then the task as knnmem.eval.recall describes it.
DESCRIPTION = __doc__ + "\n" + recall.__doc__.split("\n\n", 1)[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnmem eval --task recall", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    p.add_argument("--task", choices=["recall"], default="recall")
    p.add_argument("--model", help="local Hugging Face model directory, or a Hub id in the local cache (default: bundled "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(DEFAULT_FAMILIES),
                   help="kinds of facts, each asked --facts times")
    p.add_argument("--facts", type=int, default=96, help="facts of each family stated, and asked")
    p.add_argument("--facts-per-document", type=int, default=8)
    p.add_argument("--choices", type=int, default=4, help="candidate answers per question (chance = 1 / choices)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", default="all", help='memory layers of the knowledge configs: "all", "15-29", ...')
    p.add_argument("--topk", type=int, default=16,
                   help="memories retrieved per query and head (16: best of 8-64 on facts of --seed 1)")
    p.add_argument("--memorize-as", choices=["corpus", "documents"], default="corpus",
                   help="memorise the documents as one text, the token stream `prompt` reads (default), "
                        "or each document alone")
    p.add_argument("--sparse-keep", type=int, default=8, help="knowledge-sparse: tokens kept per head ...")
    p.add_argument("--sparse-chunk", type=int, default=128, help="... out of every this many")
    p.add_argument("--pq-m", type=int, default=16, help="knowledge-pq: sub-quantisers per vector")
    p.add_argument("--pq-bits", type=int, default=8, help="knowledge-pq: bits per code")
    p.add_argument("--adapter-layer", type=int, default=None, help="block of the adapter (default: 75%% depth)")
    p.add_argument("--adapter-steps", type=int, default=200)
    p.add_argument("--adapter-lr", type=finite_float, default=1e-3)
    p.add_argument("--adapter-gate-init", type=finite_float, default=0.0,
                   help="initial gate of the adapter (0: the frozen model unchanged at the start)")
    p.add_argument("--json", default="eval_results/recall.json")
    p.add_argument("--device", default=default_device())
    return p


def plot_path(args) -> str:
    return os.path.splitext(args.json)[0] + ".png"


def validate(parser: argparse.ArgumentParser, args) -> None:
    """Every option checked before the model loads; errors exit with the option's name."""
    check_positive(parser, args, "facts", "facts_per_document", "topk", "sparse_keep", "sparse_chunk", "pq_m",
                   "pq_bits", "adapter_steps")
    if args.choices < 2 or args.choices > args.facts:
        parser.error(f"--choices must be in [2, --facts={args.facts}], got {args.choices}")
    if args.adapter_lr <= 0:
        parser.error(f"--adapter-lr must be positive, got {args.adapter_lr}")
    if not 0 <= args.seed < 2 ** 32:
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    try:
        args.layer_list = parse_layers(args.layers)
        args.storage = {form: Storage(form, args.sparse_keep, args.sparse_chunk, args.pq_m, args.pq_bits)
                        for form in ("fp16", "sparse", "pq")}
        args.storage["sparse"].check(head_dim=1)
        if not 1 <= args.pq_bits <= 16:
            raise ValueError(f"--pq-bits must be in [1, 16], got {args.pq_bits}")
        questions(all_facts(args.families, args.facts, args.seed), args.choices, args.seed)
    except ValueError as err:
        parser.error(str(err))
    check_results_writable(parser, [args.json, plot_path(args)])


def run_settings(args) -> RecallRun:
    return RecallRun(
        configs=args.configs, families=tuple(args.families), facts=args.facts, facts_per_document=args.facts_per_document, choices=args.choices,
        seed=args.seed, layers=args.layer_list, topk=args.topk, memorize_as=args.memorize_as, storage=args.storage,
        adapter_layer=args.adapter_layer, adapter_steps=args.adapter_steps, adapter_lr=args.adapter_lr,
        adapter_gate_init=args.adapter_gate_init)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    model, tokenizer, description = load_or_exit(parser, args.model, args.device)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if any(c == "knowledge-pq" for c in args.configs) and head_dim % args.pq_m:
        parser.error(f"--pq-m must divide the model's head dim {head_dim}, got {args.pq_m}")
    check_layers(parser, args.layers, args.layer_list, model)
    if args.adapter_layer is not None and not 0 <= args.adapter_layer < config.num_hidden_layers:
        parser.error(f"--adapter-layer must be a block in [0, {config.num_hidden_layers}), got {args.adapter_layer}")
    if "knowledge-pq" in args.configs:
        tokens = memorised_tokens(tokenizer, run_settings(args))
        if tokens < 2 ** args.pq_bits:
            parser.error(f"--pq-bits {args.pq_bits}: the codebooks are learnt from the memorised text, which has "
                         f"{tokens} tokens, fewer than 2**{args.pq_bits}: give more --facts or lower --pq-bits")
    settings = corpus.recorded_options(args, ("layer_list", "storage"))
    payload = evaluate_recall(model, tokenizer, description, run_settings(args), settings)
    print_recall(payload)
    write_json(args.json, payload)
    plot_recall(payload, plot_path(args))
    return payload
