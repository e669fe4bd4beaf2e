"""`knnmem passkey`: can the model find a key hidden deep in a long text (the standard long-range test)?

    knnmem passkey                                       # 4K and 16K tokens, 3 depths, 2 trials each
    knnmem passkey --lengths 4096 16384 65536 --depths 0.1 0.5 0.9 --trials 4

A prompt is seeded filler text with one sentence stating a random 5-digit key at a given depth,
and a question at the end. Configurations:
- `local`: the model sees only the last `--segment` tokens (the question and a little filler).
- `memory`: the prompt before those tokens is read in segments through the patched model (with the
  previous segment as local context, as `xl+memory` in `knnmem eval`); then the model answers
  from the last tokens, with memory frozen during `generate()`.
- `full`: the whole prompt at once, where it fits the model's native context.
The answer is generated greedily; a trial counts if the key appears in it.
"""
from __future__ import annotations

import argparse
import os
import random
import re
from collections.abc import Callable

import torch
from tqdm import tqdm

from ..patch import patch, unpatch
from ..stream import read
from .model import load_model
from .report import write_json

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
CONFIGS = ("local", "memory", "full")


def make_prompt(tokenizer, length: int, depth: float, key: str) -> torch.Tensor:
    """Token ids (N,), N ~ `length`: filler, the needle at `depth` (0..1) of the filler, the question."""
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    unit, needle, question = encode(FILLER), encode(NEEDLE.format(key=key)), encode(QUESTION)
    units = max(1, (length - len(needle) - len(question)) // len(unit))
    at = round(depth * units)
    ids = unit * at + needle + unit * (units - at) + question
    return torch.tensor(ids)


def found(answer: str, key: str) -> bool:
    return key in re.sub(r"\D", "", answer)


def evaluate(answer: Callable[[torch.Tensor, str], str], tokenizer, lengths: list[int], depths: list[float],
             trials: int, seed: int = 0, progress: tqdm | None = None) -> dict:
    """Accuracy of `answer(prompt_ids, config)` by length and depth: {length: {depth: fraction}}."""
    rng = random.Random(seed)
    table: dict[int, dict[float, float]] = {}
    for length in lengths:
        table[length] = {}
        for depth in depths:
            hits = 0
            for _ in range(trials):
                key = f"{rng.randrange(10000, 100000)}"
                hits += found(answer(make_prompt(tokenizer, length, depth, key)), key)
                if progress is not None:
                    progress.update()
            table[length][depth] = hits / trials
    return table


def model_answerer(model, tokenizer, config: str, segment: int, max_new_tokens: int = 8, **patch_options):
    """An `answer(prompt_ids)` for one configuration of a Hugging Face causal LM."""
    def generate(ids: torch.Tensor) -> str:
        out = model.generate(ids[None].to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids.numel():], skip_special_tokens=True)

    def answer(ids: torch.Tensor) -> str:
        if config == "full":
            return generate(ids)
        if config == "local":
            return generate(ids[-segment:])
        handle = patch(model, **patch_options)
        try:
            prefix = ids[:-segment]
            for _ in read(model, prefix[None], segment, context=segment):
                pass  # reading writes memory; the logits are not needed
            with handle.frozen():
                return generate(ids[-segment:])
        finally:
            unpatch(model)

    return answer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnmem passkey", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Hugging Face model directory (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--trials", type=int, default=2, help="random keys per (length, depth)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--segment", type=int, default=512)
    p.add_argument("--memory", type=int, default=65536)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="eval_results/passkey.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("segment", "memory", "topk", "trials"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if any(n <= args.segment for n in args.lengths):
        parser.error(f"--lengths must all exceed --segment ({args.segment}), got {args.lengths}")
    if any(not 0 <= d <= 1 for d in args.depths):
        parser.error(f"--depths must be fractions in [0, 1], got {args.depths}")
    try:
        model, tokenizer, description = load_model(args.model, device=args.device)
    except (OSError, ValueError) as err:
        parser.error(f"--model: {err}")
    native = getattr(model.config, "max_position_embeddings", None)
    results = {}
    bar = tqdm(total=len(args.configs) * len(args.lengths) * len(args.depths) * args.trials, unit="trial")
    for config in args.configs:
        lengths = [n for n in args.lengths if config != "full" or native is None or n <= native]
        bar.set_description(config)
        answer = model_answerer(model, tokenizer, config, args.segment, max_memories=args.memory, topk=args.topk)
        table = evaluate(answer, tokenizer, lengths, args.depths, args.trials, args.seed, bar)
        bar.update(len(args.depths) * args.trials * (len(args.lengths) - len(lengths)))
        results[config] = {str(n): {str(d): acc for d, acc in row.items()} for n, row in table.items()}
    bar.close()
    print(f"\n{description}: passkey accuracy ({args.trials} keys per cell; depth = position of the key)")
    print(f"{'config':<8}{'length':>8}  " + "  ".join(f"d={d:<5}" for d in args.depths) + "   mean")
    for config, table in results.items():
        for length, row in table.items():
            cells = list(row.values())
            print(f"{config:<8}{length:>8}  " + "  ".join(f"{a:<7.2f}" for a in cells) + f"   {sum(cells) / len(cells):.2f}")
    payload = {"model": description, "settings": vars(args), "native_context": native, "accuracy": results}
    write_json(args.json, payload)
    _plot(results, os.path.splitext(args.json)[0] + ".png")
    return payload


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for config, table in results.items():
        lengths = [int(n) for n in table]
        ax.plot(lengths, [sum(row.values()) / len(row) for row in table.values()], marker="o", label=config)
    ax.set(xscale="log", xlabel="prompt length (tokens)", ylabel="accuracy (mean over depths)",
           title="Passkey retrieval", ylim=(-0.05, 1.05))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
