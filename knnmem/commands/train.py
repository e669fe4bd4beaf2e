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

import torch.distributed as dist

from .. import corpus
from ..handle import DEFAULT_DISTANCE, DEFAULT_TOPK, PatchSettings
from ..memory import default_pinned
from ..patch import patch
from ..positions import POLICIES
from ..search import BACKENDS
from ..train.loop import STATE_FILE, TrainSettings
from ..train.retrofit import default_layers, fine_tune, split_pieces
from ..train.trainable import TRAINABLE, check_something_trains, prepare
from .common import (HelpFormatter, check_layers, check_positive, check_writable, default_device, finite_float,
                     parse_layers, start_command)


def build_parser() -> argparse.ArgumentParser:
    d = TrainSettings()
    p = argparse.ArgumentParser(prog="knnmem train", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", help="local Hugging Face model directory, or a Hub id in the local cache (default: bundled "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--data", nargs="+", help="files, directories or globs (default: the 200 largest stdlib .py files "
                   "but the eval's held-out documents); "
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
    p.add_argument("--topk", type=int, default=DEFAULT_TOPK)
    p.add_argument("--position", choices=POLICIES, default="constant")
    p.add_argument("--distance", type=int, default=DEFAULT_DISTANCE)
    p.add_argument("--memory-backend", choices=("auto",) + BACKENDS, default="auto")
    p.add_argument("--segment", type=int, default=d.segment, help="scored tokens per window")
    p.add_argument("--context", type=int, default=512, help="local context before each segment (512: xl+memory)")
    p.add_argument("--doc-tokens", type=int, default=4096, help="documents are cut into pieces of this many tokens")
    p.add_argument("--max-docs", type=int, default=None, help="training documents (pieces) to use")
    p.add_argument("--val-docs", type=int, default=2, help="held-out documents (pieces) for validation")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=finite_float, default=d.lr, help="learning rate of LoRA / projection weights")
    p.add_argument("--lr-memory", type=finite_float, default=d.lr_memory, help="learning rate of gates and scales")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=finite_float, default=d.weight_decay)
    p.add_argument("--clip", type=finite_float, default=d.clip)
    p.add_argument("--accumulate", type=int, default=d.accumulate, help="windows per optimizer step")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="documents read side by side")
    p.add_argument("--validate-every", type=int, default=d.validate_every)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=default_device())
    return p


def validate(parser: argparse.ArgumentParser, args) -> tuple[TrainSettings, list[int] | None]:
    """Every option checked before the model loads. Returns the loop's settings and the memory
    layers given (None: the default for the model)."""
    settings = TrainSettings(
        steps=args.steps, lr=args.lr, lr_memory=args.lr_memory, warmup=args.warmup, weight_decay=args.weight_decay,
        clip=args.clip, accumulate=args.accumulate, batch_size=args.batch_size, segment=args.segment,
        context=args.context, validate_every=args.validate_every, save_every=args.save_every, seed=args.seed)
    try:
        settings.validate()
        layers = parse_layers(args.layers) if args.layers else None
        PatchSettings(layers=(0,), topk=args.topk, max_memories=args.memory, mode=args.mode, logits=args.logits,
                      position=args.position, distance=args.distance, memory_backend=args.memory_backend,
                      pinned=default_pinned(args.memory))  # the patch options, checked now
        args.paths = corpus.find_documents(args.data) if args.data else corpus.training_corpus()
    except (ValueError, OSError) as err:
        parser.error(str(err))
    check_positive(parser, args, "doc_tokens", "val_docs", "memory", "topk", "lora_rank")
    try:
        check_something_trains(args.train, args.mode, args.logits)
    except ValueError as err:
        parser.error(f"--train: {err}")
    if args.doc_tokens <= args.segment + args.context:
        parser.error(f"--doc-tokens ({args.doc_tokens}) must exceed --segment + --context ({args.segment + args.context})")
    if args.max_docs is not None and args.max_docs < args.batch_size:
        parser.error(f"--max-docs ({args.max_docs}) must be at least --batch-size ({args.batch_size})")
    has_checkpoint = os.path.lexists(os.path.join(args.output, STATE_FILE))
    if args.resume and not has_checkpoint:
        parser.error(f"--resume: {args.output} holds no checkpoint")
    if has_checkpoint and not args.resume:
        parser.error(f"--output {args.output} already holds a checkpoint: continue it with --resume, or choose "
                     "another --output (nothing is overwritten)")
    try:
        check_writable(os.path.join(args.output, "train_log.json"))
    except OSError as err:
        parser.error(f"cannot write checkpoints to {args.output!r}: {err}")
    return settings, layers


def read_pieces(args, tokenizer, world: int):
    """(training, validation) pieces of --doc-tokens tokens; exits if there are too few."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    train_docs, val_docs = split_pieces(args.paths, encode, args.doc_tokens, args.max_docs, args.val_docs)
    if len(train_docs) < args.batch_size * world or not val_docs:
        raise SystemExit(f"knnmem train: {len(train_docs)} training and {len(val_docs)} validation pieces of "
                         f"{args.doc_tokens} tokens; need at least {args.batch_size * world} and 1 "
                         "(give more --data or a smaller --doc-tokens)")
    return train_docs, val_docs


def prepare_model(args, model, layers: list[int]) -> dict:
    """Patch the memory layers and choose what trains. Returns the trainable parameters."""
    patch(model, layers=layers, topk=args.topk, max_memories=args.memory, mode=args.mode, logits=args.logits,
          position=args.position, distance=args.distance, memory_backend=args.memory_backend)
    return prepare(model, args.train, lora_rank=args.lora_rank)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings, layers = validate(parser, args)
    model, tokenizer, description, world, rank = start_command(parser, args.model, args.device)
    layers = default_layers(model.config.num_hidden_layers) if layers is None else layers
    check_layers(parser, args.layers, layers, model)
    if args.lora_rank > model.config.hidden_size:
        parser.error(f"--lora-rank must be at most the model's hidden size {model.config.hidden_size}, got {args.lora_rank}")
    train_docs, val_docs = read_pieces(args, tokenizer, world)
    trainable = prepare_model(args, model, layers)
    info = {"model": description, "data": [corpus.display_name(p) for p in args.data] if args.data else "stdlib",
            "train_documents": len(train_docs), "validation_documents": len(val_docs)}
    if rank == 0:
        print(f"knnmem train: {description}; memory layers {layers} ({args.mode}); training {args.train}: "
              f"{sum(p.numel() for p in trainable.values()):,} parameters; {len(train_docs)} training / "
              f"{len(val_docs)} validation documents of {args.doc_tokens} tokens")
    start = time.perf_counter()
    log = fine_tune(model, train_docs, val_docs, settings, args.output, args.resume, info, rank)
    if rank == 0:
        print(f"done: {log['step']} steps, {log['tokens']:,} tokens, {time.perf_counter() - start:.0f} s; "
              f"checkpoint in {args.output} (knnmem eval --checkpoint {args.output})")
    if world > 1:
        dist.destroy_process_group()
    return log
