"""`knnmem eval --task recall`: facts read once, asked later without them in the prompt.

    knnmem eval --task recall                                  # 64 facts, every configuration
    knnmem eval --task recall --facts 128 --configs none prompt knowledge-fp16

Facts come from the Unicode database of Python's standard library (`unicodedata`): a seeded sample
of symbol characters and their code points, which a small model does not know by heart. They are
stated in documents, `--facts-per-document` each ("The code point of UMBRELLA is U+2602. ..."),
and each is later asked as a cloze, "The code point of UMBRELLA is U+", answered by ranking the
true code point against `--choices - 1` code points of other facts by the model's log-likelihood
(chance: 1 / choices).

Configurations (the question is all the model is given, except for `prompt`):
- `none`: what the model knows by itself.
- `prompt`: every document, then the question: the upper bound, paying the documents' tokens per question.
- `knowledge-fp16`, `knowledge-sparse`, `knowledge-pq`: the documents memorised once into the
  knowledge memory of the patched model, in each storage form (`knnmem.knowledge`); by default as
  one text, the same token stream `prompt` reads (`--memorize-as documents`: each alone).
- `adapter`: a `ResidualMemory` trained on the documents with the model frozen (`knnmem.adapters`).
Reported for each: accuracy, prompt tokens and seconds per question, seconds to memorise, and
bytes stored per memorised token.
"""
from __future__ import annotations

import argparse
import inspect
import os
import random
import time
import unicodedata

import torch
from tqdm import tqdm

from .. import adapters
from ..knowledge import Storage
from ..patch import patch, unpatch
from ..train.loop import TrainSettings
from .model import load_model
from .report import write_json
from .run import check_writable, parse_layers

CONFIGS = ("none", "prompt", "knowledge-fp16", "knowledge-sparse", "knowledge-pq", "adapter")
# Symbol blocks whose characters have short, distinct names: Miscellaneous Symbols, Dingbats,
# Miscellaneous Symbols and Pictographs.
BLOCKS = ((0x2600, 0x27C0), (0x1F300, 0x1F600))
STATEMENT = "The code point of {name} is U+{code}."
QUESTION = "The code point of {name} is U+"


def unicode_facts(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (name, hex code point) pairs of named symbol characters, sampled with `seed`."""
    pool = [(unicodedata.name(chr(c)), f"{c:04X}") for lo, hi in BLOCKS for c in range(lo, hi)
            if unicodedata.name(chr(c), "")]
    if not 0 < n <= len(pool):
        raise ValueError(f"--facts must be in [1, {len(pool)}], got {n}")
    return random.Random(seed).sample(pool, n)


def documents(facts: list[tuple[str, str]], per_document: int) -> list[str]:
    return [" ".join(STATEMENT.format(name=name, code=code) for name, code in facts[i:i + per_document])
            for i in range(0, len(facts), per_document)]


def questions(facts: list[tuple[str, str]], choices: int, seed: int) -> list[tuple[str, list[str]]]:
    """(question, candidates with the true answer first) per fact; distractors from other facts."""
    rng = random.Random(seed + 1)
    codes = [code for _, code in facts]
    return [(QUESTION.format(name=name), [code] + rng.sample([c for c in codes if c != code], choices - 1))
            for name, code in facts]


@torch.no_grad()
def best_candidate(model, prefix: list[int], candidates: list[list[int]]) -> int:
    """Index of the candidate continuation (token ids) of `prefix` with the highest log-likelihood.
    The prefix is read once; the candidates then continue from its KV cache in one batch,
    right-padded (padding comes after what is scored)."""
    device = model.device
    # transformers 5.24 renamed past_key_values to cache (the old name still works, with a warning)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(torch.tensor([prefix], device=device), use_cache=True)
    cache = out[name]
    cache.batch_repeat_interleave(len(candidates))
    longest = max(len(c) for c in candidates)
    ids = torch.zeros(len(candidates), longest, dtype=torch.long)
    for row, cand in enumerate(candidates):
        ids[row, :len(cand)] = torch.tensor(cand)
    logits = model(ids.to(device), use_cache=True, **{name: cache}).logits
    first = out.logits[0, -1].float().log_softmax(-1)
    logp = logits[:, :-1].float().log_softmax(-1)
    scores = [first[c[0]].item() + logp[row, torch.arange(len(c) - 1), torch.tensor(c[1:], dtype=torch.long)].sum().item()
              for row, c in enumerate(candidates)]
    return max(range(len(candidates)), key=scores.__getitem__)


def accuracy(model, encode, asked: list[tuple[str, list[str]]], context: list[int], bar: tqdm) -> dict:
    """Fraction answered right, seconds and prompt tokens per question, with `context` token ids
    before each question."""
    start, right, tokens = time.perf_counter(), 0, 0
    for question, candidates in asked:
        prefix = context + encode(question)
        right += best_candidate(model, prefix, [encode(c) for c in candidates]) == 0
        tokens += len(prefix)
        bar.update()
    n = len(asked)
    return {"accuracy": right / n, "seconds_per_question": (time.perf_counter() - start) / n,
            "prompt_tokens": tokens / n}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnmem eval --task recall", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["recall"], default="recall")
    p.add_argument("--model", help="local Hugging Face model directory (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--facts", type=int, default=64, help="facts stated, and asked")
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
    p.add_argument("--adapter-lr", type=float, default=1e-3)
    p.add_argument("--adapter-gate-init", type=float, default=0.0,
                   help="initial gate of the adapter (0: the frozen model unchanged at the start)")
    p.add_argument("--json", default="eval_results/recall.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _validate(parser, args) -> None:
    for name in ("facts", "facts_per_document", "topk", "sparse_keep", "sparse_chunk", "pq_m", "pq_bits",
                 "adapter_steps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.choices < 2 or args.choices > args.facts:
        parser.error(f"--choices must be in [2, --facts={args.facts}], got {args.choices}")
    if args.adapter_lr <= 0:
        parser.error(f"--adapter-lr must be positive, got {args.adapter_lr}")
    try:
        args.layer_list = parse_layers(args.layers)
        args.storage = {form: Storage(form, args.sparse_keep, args.sparse_chunk, args.pq_m, args.pq_bits)
                        for form in ("fp16", "sparse", "pq")}
        args.storage["sparse"].check(head_dim=1)
        if not 1 <= args.pq_bits <= 16:
            raise ValueError(f"--pq-bits must be in [1, 16], got {args.pq_bits}")
        unicode_facts(args.facts, args.seed)
    except ValueError as err:
        parser.error(str(err))
    for path in (args.json, os.path.splitext(args.json)[0] + ".png"):
        try:
            check_writable(path)
        except OSError as err:
            parser.error(f"cannot write results to {path!r}: {err}")


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    try:
        model, tokenizer, description = load_model(args.model, device=args.device)
    except (OSError, ValueError) as err:
        parser.error(f"--model: {err}")
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if any(c == "knowledge-pq" for c in args.configs) and head_dim % args.pq_m:
        parser.error(f"--pq-m must divide the model's head dim {head_dim}, got {args.pq_m}")
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    facts = unicode_facts(args.facts, args.seed)
    texts = documents(facts, args.facts_per_document)
    asked = questions(facts, args.choices, args.seed)
    corpus = "\n\n".join(texts)
    prompt = encode(corpus + "\n\n")
    memorised = [torch.tensor(encode(t)) for t in (texts if args.memorize_as == "documents" else [corpus])]
    memorised_tokens = sum(d.numel() for d in memorised)
    bar = tqdm(total=len(args.configs) * len(asked), desc="recall", unit="question")
    results = {}
    for config in args.configs:
        bar.set_description(config)
        row: dict = {}
        if config in ("none", "prompt"):
            row.update(accuracy(model, encode, asked, prompt if config == "prompt" else [], bar))
        elif config.startswith("knowledge-"):
            storage = args.storage[config.removeprefix("knowledge-")]
            # The questions are read with memory frozen: the document memory stays empty, keep it small.
            handle = patch(model, layers=args.layer_list, topk=args.topk, max_memories=1024)
            try:
                start = time.perf_counter()
                knowledge = handle.memorize(memorised, storage=storage, progress=False)
                row["memorize_seconds"] = time.perf_counter() - start
                with handle.frozen():  # questions read knowledge; they are not written anywhere
                    row.update(accuracy(model, encode, asked, [], bar))
                row.update(storage=storage.describe(), stored_tokens_per_head=len(knowledge),
                           stored_bytes=knowledge.nbytes(), overhead_bytes=knowledge.overhead_bytes(),
                           bytes_per_token=knowledge.bytes_per_token())
            finally:
                unpatch(model)
        else:
            adapter = adapters.attach(model, args.adapter_layer, gate_init=args.adapter_gate_init)
            try:
                settings = TrainSettings(steps=args.adapter_steps, lr=args.adapter_lr, lr_memory=args.adapter_lr,
                                         warmup=min(20, args.adapter_steps // 10), segment=128, context=0,
                                         validate_every=0, save_every=0, seed=args.seed)
                start = time.perf_counter()
                log = adapters.train_adapter(model, memorised, settings, progress=False)
                row["memorize_seconds"] = time.perf_counter() - start
                row.update(accuracy(model, encode, asked, [], bar))
                stored = sum(p.numel() * p.element_size() for p in adapter.parameters())
                row.update(gate=adapter.gate.item(), loss_first=log["history"][0], loss_last=log["history"][-1],
                           stored_bytes=stored, bytes_per_token=stored / memorised_tokens,
                           block=adapters.default_layer(model.config.num_hidden_layers)
                           if args.adapter_layer is None else args.adapter_layer)
            finally:
                adapters.detach(model)
        results[config] = row
    bar.close()
    upper = results.get("prompt", {}).get("accuracy")
    for row in results.values():
        row["vs_prompt"] = row["accuracy"] / upper if upper else None
    payload = {"model": description, "task": "recall", "facts": len(facts), "documents": len(texts),
               "memorised_tokens": memorised_tokens, "chance": 1 / args.choices,
               "settings": {k: v for k, v in vars(args).items() if k not in ("layer_list", "storage")},
               "configs": results}
    print_recall(payload)
    write_json(args.json, payload)
    plot_recall(payload, os.path.splitext(args.json)[0] + ".png")
    return payload


def print_recall(payload: dict) -> None:
    print(f"\n{payload['model']}: {payload['facts']} facts in {payload['documents']} documents "
          f"({payload['memorised_tokens']} tokens), chance {payload['chance']:.2f}")
    print(f"{'config':<18}{'accuracy':>9}{'vs prompt':>10}{'prompt tok':>11}{'s/question':>11}"
          f"{'memorise s':>11}{'bytes/token':>12}")
    for name, row in payload["configs"].items():
        vs = f"{100 * row['vs_prompt']:.0f}%" if row["vs_prompt"] is not None else ""
        memorise = f"{row['memorize_seconds']:.1f}" if "memorize_seconds" in row else ""
        size = f"{row['bytes_per_token']:.0f}" if "bytes_per_token" in row else ""
        print(f"{name:<18}{row['accuracy']:>9.3f}{vs:>10}{row['prompt_tokens']:>11.0f}{row['seconds_per_question']:>11.3f}"
              f"{memorise:>11}{size:>12}")


def plot_recall(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["configs"])
    fig, (acc, size) = plt.subplots(1, 2, figsize=(11, 4))
    acc.bar(names, [payload["configs"][n]["accuracy"] for n in names])
    acc.axhline(payload["chance"], linestyle="--", color="gray", label="chance")
    acc.set(ylabel="accuracy", ylim=(0, 1), title=f"Recall of {payload['facts']} facts")
    acc.legend()
    stored = [n for n in names if "bytes_per_token" in payload["configs"][n]]
    size.bar(stored, [payload["configs"][n]["bytes_per_token"] for n in stored])
    size.set(ylabel="bytes stored per memorised token", yscale="log", title="Storage")
    for ax in (acc, size):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
