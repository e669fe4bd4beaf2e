"""`knnmem train`: fine-tune a retrofit on long documents, read with memory as the eval reads them.

    knnmem train                                   # bundled SmolLM2-135M, stdlib train split, gates only
    knnmem train --train lora --steps 1000 --output runs/lora
    knnmem train --output runs/lora --resume       # continue an interrupted run
    knnmem eval --checkpoint runs/train            # evaluate the result on held-out documents
    torchrun --nproc-per-node 2 -m knnmem.train    # batches split across processes

By default memory sits in the layers at 60-80% depth (a fifth of them) in gate mode, and only
the gates and memory scales are trained (base model frozen).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from ..eval import corpus
from ..eval.model import start_command
from ..eval.run import check_writable, parse_layers
from ..patch import patch
from ..positions import POLICIES
from ..search import BACKENDS
from .loop import TrainSettings, document_pieces, perplexity, train
from .trainable import TRAINABLE, TRAINED_FILE, prepare, read_trained


def default_layers(n_layers: int) -> list[int]:
    """A fifth of the layers, at 60-80% depth (the paper puts its memory layer near 75%)."""
    return list(range(int(0.6 * n_layers), max(int(0.8 * n_layers), int(0.6 * n_layers) + 1)))


def build_parser() -> argparse.ArgumentParser:
    d = TrainSettings()
    p = argparse.ArgumentParser(prog="knnmem train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Hugging Face model directory (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data", nargs="+", help="files, directories or globs (default: stdlib .py files); "
                   "a by-document split keeps validation documents out of training")
    p.add_argument("--output", default="runs/train", help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    p.add_argument("--train", choices=TRAINABLE, default="memory",
                   help="memory: gates and memory scales; attention: also the memory layers' projections; "
                        "lora: also LoRA adapters on them (peft)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--layers", default=None, help='memory layers: "all", "18-23", ... (default: 60-80%% depth)')
    p.add_argument("--mode", choices=["gate", "joint"], default="gate")
    p.add_argument("--logits", choices=["normalized", "raw"], default="normalized")
    p.add_argument("--memory", type=int, default=65536, help="memory size (tokens per layer and head)")
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--position", choices=POLICIES, default="constant")
    p.add_argument("--distance", type=int, default=512)
    p.add_argument("--memory-backend", choices=("auto",) + BACKENDS, default="auto")
    p.add_argument("--segment", type=int, default=d.segment, help="scored tokens per window")
    p.add_argument("--context", type=int, default=512, help="local context before each segment (512: xl+memory)")
    p.add_argument("--doc-tokens", type=int, default=4096, help="documents are cut into pieces of this many tokens")
    p.add_argument("--max-docs", type=int, default=None, help="training documents (pieces) to use")
    p.add_argument("--val-docs", type=int, default=2, help="held-out documents (pieces) for validation")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of LoRA / projection weights")
    p.add_argument("--lr-memory", type=float, default=d.lr_memory, help="learning rate of gates and scales")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip)
    p.add_argument("--accumulate", type=int, default=d.accumulate, help="windows per optimizer step")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="documents read side by side")
    p.add_argument("--validate-every", type=int, default=d.validate_every)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = TrainSettings(
        steps=args.steps, lr=args.lr, lr_memory=args.lr_memory, warmup=args.warmup, weight_decay=args.weight_decay,
        clip=args.clip, accumulate=args.accumulate, batch_size=args.batch_size, segment=args.segment,
        context=args.context, validate_every=args.validate_every, save_every=args.save_every, seed=args.seed)
    try:
        settings.validate()
        layers = parse_layers(args.layers) if args.layers else None
    except ValueError as err:
        parser.error(str(err))
    for name in ("doc_tokens", "val_docs", "memory", "topk", "lora_rank"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.doc_tokens <= args.segment + args.context:
        parser.error(f"--doc-tokens ({args.doc_tokens}) must exceed --segment + --context ({args.segment + args.context})")
    if args.max_docs is not None and args.max_docs < args.batch_size:
        parser.error(f"--max-docs ({args.max_docs}) must be at least --batch-size ({args.batch_size})")
    if args.resume and not os.path.exists(os.path.join(args.output, "trainer_state.pt")):
        parser.error(f"--resume: {args.output} holds no checkpoint")
    try:
        check_writable(os.path.join(args.output, "train_log.json"))
    except OSError as err:
        parser.error(f"cannot write checkpoints to {args.output!r}: {err}")
    model, tokenizer, description, world, rank = start_command(parser, args.model, args.device)
    n_layers = model.config.num_hidden_layers
    layers = default_layers(n_layers) if layers is None else layers
    if not all(0 <= i < n_layers for i in layers):
        parser.error(f"--layers {args.layers!r}: this model has layers 0..{n_layers - 1}")
    paths = corpus.find_documents(args.data) if args.data else corpus.default_corpus()
    train_paths, validation_paths = corpus.split(paths)
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    train_docs = document_pieces(train_paths, encode, args.doc_tokens, args.max_docs)
    val_docs = document_pieces(validation_paths, encode, args.doc_tokens, args.val_docs)
    if len(train_docs) < args.batch_size * world or not val_docs:
        raise SystemExit(f"knnmem train: {len(train_docs)} training and {len(val_docs)} validation pieces of "
                         f"{args.doc_tokens} tokens; need at least {args.batch_size * world} and 1 "
                         "(give more --data or a smaller --doc-tokens)")
    patch(model, layers=layers, topk=args.topk, max_memories=args.memory, mode=args.mode, logits=args.logits,
          position=args.position, distance=args.distance, memory_backend=args.memory_backend)
    trainable = prepare(model, args.train, lora_rank=args.lora_rank)
    info = {"model": description, "data": [corpus.display_name(p) for p in args.data] if args.data else "stdlib",
            "train_documents": len(train_docs), "validation_documents": len(val_docs)}
    if rank == 0:
        print(f"knnmem train: {description}; memory layers {layers} ({args.mode}); training {args.train}: "
              f"{sum(p.numel() for p in trainable.values()):,} parameters; {len(train_docs)} training / "
              f"{len(val_docs)} validation documents of {args.doc_tokens} tokens")
    start = time.perf_counter()
    if args.resume:
        info["validation_ppl_before"] = read_trained(os.path.join(args.output, TRAINED_FILE))[1].get("validation_ppl_before")
    else:
        before = perplexity(model, val_docs, args.segment, args.context, args.batch_size)
        if rank == 0:
            print(f"validation ppl before training: {before:.3f}")
        info["validation_ppl_before"] = before
    log = train(model, train_docs, settings, val_docs, output=args.output, resume=args.resume, info=info)
    if rank == 0:
        print(f"done: {log['step']} steps, {log['tokens']:,} tokens, {time.perf_counter() - start:.0f} s; "
              f"checkpoint in {args.output} (knnmem eval --checkpoint {args.output})")
    if world > 1:
        dist.destroy_process_group()
    return log
