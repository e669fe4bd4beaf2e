"""The passkey task (`knnmem passkey`): can the model find a key hidden deep in a long text (the
standard long-range test)?

A prompt is seeded filler text with one sentence stating a random 5-digit key at a given depth,
and a question at the end. Configurations:
- `local`: the model sees only the last `--segment` tokens (the question and a little filler).
- `memory`: the prompt before those tokens is read in segments through the patched model (with the
  previous segment as local context, as `xl+memory` in `knnmem eval`, memory in every head by
  default); then the model answers from the last tokens, with memory frozen during `generate()`.
- `sinks+window`: the prompt's first 4 tokens (attention sinks) and its last tokens, as many as fit
  the native context with the answer, read at once: what a sliding window of the native context
  sees. (Not StreamingLLM's rolling KV cache, `knnmem.stream.SlidingCache`: on the bundled model
  that cache loses a key that is inside its window, e.g. 12K tokens, depth 0.9, while these same
  tokens read at once find it; see the README.)
- `full`: the whole prompt at once, where it fits the model's native context.
The answer is generated greedily; a trial counts if the key appears in it.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable

import torch
from tqdm import tqdm

from ..hf import native_context
from ..patch import patch, unpatch
from ..stream import DEFAULT_SINKS, read

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
CONFIGS = ("local", "memory", "sinks+window", "full")


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
        if config == "sinks+window":
            window = (native_context(model) or 2048) - DEFAULT_SINKS - max_new_tokens
            return generate(torch.cat([ids[:DEFAULT_SINKS], ids[-window:]]) if ids.numel() > DEFAULT_SINKS + window
                            else ids)
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


def evaluate_configs(model, tokenizer, configs: list[str], lengths: list[int], depths: list[float], trials: int,
                     segment: int = 512, seed: int = 0, on_config: Callable[[dict], None] | None = None,
                     **patch_options) -> dict:
    """Accuracy {config: {length: {depth: fraction}}} (keys as strings) of each configuration; `full`
    only at the lengths that fit the model's native context. patch_options: keyword arguments of
    `knnmem.patch` for `memory` (e.g. heads, topk, max_memories, neighbours). on_config(results so
    far) follows each configuration."""
    native = native_context(model)
    results = {}
    bar = tqdm(total=len(configs) * len(lengths) * len(depths) * trials, unit="trial")
    for config in configs:
        fitting = [n for n in lengths if config != "full" or native is None or n <= native]
        bar.set_description(config)
        answer = model_answerer(model, tokenizer, config, segment, **patch_options)
        table = evaluate(answer, tokenizer, fitting, depths, trials, seed, bar)
        bar.update(len(depths) * trials * (len(lengths) - len(fitting)))
        results[config] = {str(n): {str(d): acc for d, acc in row.items()} for n, row in table.items()}
        if on_config is not None:
            on_config(results)
    bar.close()
    return results


def print_passkey(payload: dict) -> None:
    """The table of `knnmem passkey`: accuracy by config, length and depth."""
    depths, trials = payload["settings"]["depths"], payload["settings"]["trials"]
    print(f"\n{payload['model']}: passkey accuracy ({trials} keys per cell; depth = position of the key)")
    print(f"{'config':<8}{'length':>8}  " + "  ".join(f"d={d:<5}" for d in depths) + "   mean")
    for config, table in payload["accuracy"].items():
        for length, row in table.items():
            cells = list(row.values())
            print(f"{config:<8}{length:>8}  " + "  ".join(f"{a:<7.2f}" for a in cells) + f"   {sum(cells) / len(cells):.2f}")


def plot_passkey(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = [("o", "-", 9), ("s", "--", 7), ("^", ":", 6), ("x", "-.", 8)]  # overlapping lines stay visible
    for (config, table), (marker, line, size) in zip(results.items(), styles * len(results)):
        lengths = [int(n) for n in table]
        ax.plot(lengths, [sum(row.values()) / len(row) for row in table.values()], marker=marker, linestyle=line,
                markersize=size, markerfacecolor="none", label=config)
    ax.set(xscale="log", xlabel="prompt length (tokens)", ylabel="accuracy (mean over depths)",
           title="Passkey retrieval", ylim=(-0.05, 1.05))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
