"""The recall task (`knnmem eval --task recall`): facts read once, asked later without them in
the prompt.

Facts come from structured data of Python's standard library, in families that a small model does
not know by heart, each a seeded sample of `--facts` (key, value) pairs:
- `unicode` (`unicodedata`, symbol blocks): "The code point of UMBRELLA is U+2602."
- `html` (`html.entities`): "The HTML entity &hearts; is character #9829."
- `errno` (`errno`, this machine's numbers): "Error ENOENT has errno=2."
They are stated in documents of one family, `--facts-per-document` each, shuffled together; each
fact is later asked as a cloze of the same statement ("The code point of UMBRELLA is U+"),
answered by ranking the true value against `--choices - 1` values of other facts of its family by
the model's log-likelihood (chance: 1 / choices). Every configuration asks the same questions.

Configurations (the question is all the model is given, except for `prompt`):
- `none`: what the model knows by itself.
- `prompt`: every document, then the question: the upper bound, paying the documents' tokens per
  question (read once into a KV cache that each question continues).
- `knowledge-fp16`, `knowledge-sparse`, `knowledge-pq`: the documents memorised once into the
  knowledge memory of the patched model, in each storage form (`knnmem.knowledge`); by default as
  one text, the same token stream `prompt` reads (`--memorize-as documents`: each alone).
- `adapter`: a `ResidualMemory` trained on the documents with the model frozen (`knnmem.adapters`).
Reported for each: accuracy with its 95% (Wilson) interval, overall and per family, prompt tokens
and seconds per question, seconds to memorise, and bytes stored per memorised token.
"""
from __future__ import annotations

import errno
import html.entities
import inspect
import math
import random
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .. import adapters
from ..knowledge import Storage
from ..patch import patch, unpatch
from ..train import TrainSettings, train_adapter

CONFIGS = ("none", "prompt", "knowledge-fp16", "knowledge-sparse", "knowledge-pq", "adapter")
# Symbol blocks whose characters have short, distinct names: Miscellaneous Symbols, Dingbats,
# Miscellaneous Symbols and Pictographs.
BLOCKS = ((0x2600, 0x27C0), (0x1F300, 0x1F600))


@dataclass(frozen=True)
class Family:
    """A kind of fact: its statement (a cloze: the value ends it, before `end`) and its pool."""

    statement: str  # with {key}; the value follows it, then `end`
    end: str
    pool: Callable[[], list[tuple[str, str]]]

    def state(self, key: str, value: str) -> str:
        return self.statement.format(key=key) + value + self.end

    def ask(self, key: str) -> str:
        return self.statement.format(key=key)


FAMILIES = {
    "unicode": Family("The code point of {key} is U+", ".", lambda: [
        (unicodedata.name(chr(c)), f"{c:04X}") for lo, hi in BLOCKS for c in range(lo, hi) if unicodedata.name(chr(c), "")]),
    "html": Family("The HTML entity &{key}; is character #", ".", lambda: [
        (name, str(code)) for name, code in sorted(html.entities.name2codepoint.items())]),
    "errno": Family("Error {key} has errno=", ".", lambda: [
        (name, str(number)) for number, name in sorted(errno.errorcode.items())]),
}
DEFAULT_FAMILIES = tuple(FAMILIES)

Fact = tuple[str, str, str]  # (family, key, value)


def family_facts(family: str, n: int, seed: int) -> list[Fact]:
    """`n` facts of `family`, sampled with `seed` (ValueError naming --facts if the pool is smaller)."""
    if family not in FAMILIES:
        raise ValueError(f"--families: unknown {family!r}; choose from {list(FAMILIES)}")
    pool = FAMILIES[family].pool()
    if not 0 < n <= len(pool):
        raise ValueError(f"--facts must be in [1, {len(pool)}] for the {family} family, got {n}")
    return [(family, key, value) for key, value in random.Random(f"{family}-{seed}").sample(pool, n)]


def all_facts(families: Sequence[str], n: int, seed: int) -> list[Fact]:
    """`n` facts of each family, in family order."""
    return [fact for family in families for fact in family_facts(family, n, seed)]


def documents(facts: list[Fact], per_document: int, seed: int = 0) -> list[str]:
    """Documents of `per_document` facts of one family each, shuffled with `seed`."""
    texts = []
    for family in dict.fromkeys(f for f, _, _ in facts):
        mine = [(k, v) for f, k, v in facts if f == family]
        texts += [" ".join(FAMILIES[family].state(k, v) for k, v in mine[i:i + per_document])
                  for i in range(0, len(mine), per_document)]
    random.Random(seed).shuffle(texts)
    return texts


def questions(facts: list[Fact], choices: int, seed: int) -> list[tuple[str, str, list[str]]]:
    """(family, question, candidates with the true value first) per fact; distractors are values
    of other facts of the same family."""
    rng = random.Random(seed + 1)
    asked = []
    for family, key, value in facts:
        others = sorted({v for f, _, v in facts if f == family and v != value})
        if len(others) < choices - 1:
            raise ValueError(f"--choices {choices}: the {family} facts have only {len(others) + 1} distinct values")
        asked.append((family, FAMILIES[family].ask(key), [value] + rng.sample(others, choices - 1)))
    return asked


def wilson_interval(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion right / n."""
    if n == 0:
        return (0.0, 1.0)
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _cache_name(model) -> str:
    # transformers 5.24 renamed past_key_values to cache (the old name still works, with a warning)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _crop(cache, length: int) -> None:
    """Cut `cache` back to its first `length` tokens (transformers 5 crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def candidate_scores(model, prefix: list[int], candidates: list[list[int]], cache=None) -> list[float]:
    """Log-likelihood of each candidate continuation (token ids) of `prefix`.

    The prefix is read once, after `cache` (a KV cache of earlier tokens, e.g. the documents of
    `prompt`; None: nothing before), then each candidate continues it in turn, the cache cropped
    back after each: no copy of a long cache is ever made, and `cache` is returned to its length.
    Raises FloatingPointError if any score is not finite (NaN logits must never rank a candidate)."""
    name = _cache_name(model)
    ids = lambda tokens: torch.tensor([tokens], device=model.device)  # noqa: E731
    before = cache.get_seq_length() if cache is not None else 0
    out = model(ids(prefix), use_cache=True, **({name: cache} if cache is not None else {}))
    cache = out[name]
    first = out.logits[0, -1].float().log_softmax(-1)
    read = cache.get_seq_length()
    scores = []
    for cand in candidates:
        score = first[cand[0]].item()
        if len(cand) > 1:
            logp = model(ids(cand[:-1]), use_cache=True, **{name: cache}).logits[0].float().log_softmax(-1)
            score += logp[torch.arange(len(cand) - 1), torch.tensor(cand[1:], dtype=torch.long)].sum().item()
            _crop(cache, read)
        scores.append(score)
    _crop(cache, before)
    if not all(math.isfinite(x) for x in scores):
        raise FloatingPointError(f"the model scored the candidates {scores}: its logits are not finite (NaN or inf), "
                                 "so no answer can be ranked")
    return scores


def answered_right(scores: list[float]) -> bool:
    """The true answer (candidate 0) strictly beats every distractor; a tie is wrong."""
    return all(scores[0] > other for other in scores[1:])


@torch.no_grad()
def _context_cache(model, context: list[int]):
    """The KV cache of `context` read once (None if empty), which every question continues."""
    if not context:
        return None
    return model(torch.tensor([context], device=model.device), use_cache=True)[_cache_name(model)]


def accuracy(model, encode, asked: list[tuple[str, str, list[str]]], context: list[int], bar: tqdm) -> dict:
    """Fraction answered right (with its 95% interval, overall and per family), seconds and
    prompt tokens per question, with `context` token ids before each question (read once)."""
    start = time.perf_counter()
    cache = _context_cache(model, context)
    right: dict[str, list[bool]] = {}
    tokens = 0
    for family, question, candidates in asked:
        prefix = encode(question)
        scores = candidate_scores(model, prefix, [encode(c) for c in candidates], cache)
        right.setdefault(family, []).append(answered_right(scores))
        tokens += len(context) + len(prefix)
        bar.update()
    n, hits = len(asked), sum(sum(r) for r in right.values())
    return {"accuracy": hits / n, "interval95": wilson_interval(hits, n), "questions": n,
            "by_family": {f: {"accuracy": sum(r) / len(r), "interval95": wilson_interval(sum(r), len(r)),
                              "questions": len(r)} for f, r in right.items()},
            "seconds_per_question": (time.perf_counter() - start) / n, "prompt_tokens": tokens / n}


def _default_storage() -> dict[str, Storage]:
    return {form: Storage(form) for form in ("fp16", "sparse", "pq")}


@dataclass(frozen=True)
class RecallRun:
    """What a recall evaluation runs. families: kinds of facts (`FAMILIES`); facts: facts of each
    family stated, and asked; facts_per_document: facts per document; choices: candidate answers
    per question; seed: of the facts, the documents' order, the distractors and the adapter's training. Knowledge configs patch `layers` (None: all) with `topk` and
    memorise the documents as one text (memorize_as "corpus") or each alone ("documents"), in the
    `storage` of their form ("fp16", "sparse", "pq"). The adapter sits on block `adapter_layer`
    (None: 75% depth) and trains for `adapter_steps` at `adapter_lr` from `adapter_gate_init`."""

    configs: Sequence[str] = CONFIGS
    families: Sequence[str] = DEFAULT_FAMILIES
    facts: int = 96
    facts_per_document: int = 8
    choices: int = 4
    seed: int = 0
    layers: list[int] | None = None
    topk: int = 16
    memorize_as: str = "corpus"
    storage: Mapping[str, Storage] = field(default_factory=_default_storage)
    adapter_layer: int | None = None
    adapter_steps: int = 200
    adapter_lr: float = 1e-3
    adapter_gate_init: float = 0.0


def knowledge_row(model, encode, asked, memorised: list[torch.Tensor], storage: Storage, run: RecallRun,
                  bar: tqdm) -> dict:
    """A knowledge config: the documents memorised once, then every question with memory frozen."""
    # The questions are read with memory frozen: the document memory stays empty, keep it small.
    handle = patch(model, layers=run.layers, topk=run.topk, max_memories=1024)
    try:
        row: dict = {}
        start = time.perf_counter()
        knowledge = handle.memorize(memorised, storage=storage, progress=False)
        row["memorize_seconds"] = time.perf_counter() - start
        with handle.frozen():  # questions read knowledge; they are not written anywhere
            row.update(accuracy(model, encode, asked, [], bar))
        row.update(storage=storage.describe(), stored_tokens_per_head=len(knowledge),
                   stored_bytes=knowledge.nbytes(), overhead_bytes=knowledge.overhead_bytes(),
                   bytes_per_token=knowledge.bytes_per_token())
        return row
    finally:
        unpatch(model)


def adapter_row(model, encode, asked, memorised: list[torch.Tensor], run: RecallRun, bar: tqdm) -> dict:
    """The adapter config: a ResidualMemory trained on the documents, then every question."""
    adapter = adapters.attach(model, run.adapter_layer, gate_init=run.adapter_gate_init)
    try:
        row: dict = {}
        settings = TrainSettings(steps=run.adapter_steps, lr=run.adapter_lr, lr_memory=run.adapter_lr,
                                 warmup=min(20, run.adapter_steps // 10), segment=128, context=0,
                                 validate_every=0, save_every=0, seed=run.seed)
        start = time.perf_counter()
        log = train_adapter(model, memorised, settings, progress=False)
        row["memorize_seconds"] = time.perf_counter() - start
        row.update(accuracy(model, encode, asked, [], bar))
        stored = sum(p.numel() * p.element_size() for p in adapter.parameters())
        row.update(gate=adapter.gate.item(), loss_first=log["history"][0], loss_last=log["history"][-1],
                   stored_bytes=stored, bytes_per_token=stored / sum(d.numel() for d in memorised),
                   block=adapters.default_layer(model.config.num_hidden_layers)
                   if run.adapter_layer is None else run.adapter_layer)
        return row
    finally:
        adapters.detach(model)


def _memorised(tokenizer, run: "RecallRun") -> tuple[list[str], list[torch.Tensor]]:
    """(the documents stating the facts, the token ids memorised: one corpus or each document)."""
    texts = documents(all_facts(run.families, run.facts, run.seed), run.facts_per_document, run.seed)
    corpus = "\n\n".join(texts)
    return texts, [torch.tensor(tokenizer(t, add_special_tokens=False).input_ids)
                   for t in (texts if run.memorize_as == "documents" else [corpus])]


def memorised_tokens(tokenizer, run: "RecallRun") -> int:
    """Tokens the knowledge configurations of `run` memorise (PQ learns its codebooks from them)."""
    return sum(ids.numel() for ids in _memorised(tokenizer, run)[1])


def evaluate_recall(model, tokenizer, description: str, run: RecallRun, settings: dict | None = None) -> dict:
    """The result of `knnmem eval --task recall`: every configuration of `run`, with accuracy
    relative to `prompt`'s. `settings` is recorded as given."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    facts = all_facts(run.families, run.facts, run.seed)
    asked = questions(facts, run.choices, run.seed)
    texts, memorised = _memorised(tokenizer, run)
    prompt = encode("\n\n".join(texts) + "\n\n")
    bar = tqdm(total=len(run.configs) * len(asked), desc="recall", unit="question")
    results = {}
    for config in run.configs:
        bar.set_description(config)
        if config in ("none", "prompt"):
            results[config] = accuracy(model, encode, asked, prompt if config == "prompt" else [], bar)
        elif config.startswith("knowledge-"):
            storage = run.storage[config.removeprefix("knowledge-")]
            results[config] = knowledge_row(model, encode, asked, memorised, storage, run, bar)
        else:
            results[config] = adapter_row(model, encode, asked, memorised, run, bar)
    bar.close()
    upper = results.get("prompt", {}).get("accuracy")
    for row in results.values():
        row["vs_prompt"] = row["accuracy"] / upper if upper else None
    return {"model": description, "task": "recall", "facts": len(facts), "families": list(run.families),
            "documents": len(texts),
            "memorised_tokens": sum(d.numel() for d in memorised), "chance": 1 / run.choices,
            "settings": settings or {}, "configs": results}


def print_recall(payload: dict) -> None:
    print(f"\n{payload['model']}: {payload['facts']} facts in {payload['documents']} documents "
          f"({payload['memorised_tokens']} tokens), chance {payload['chance']:.2f}")
    families = payload["families"]
    print(f"{'config':<18}{'accuracy':>9}{'95% interval':>14}" + "".join(f"{f:>9}" for f in families) +
          f"{'vs prompt':>10}{'prompt tok':>11}{'s/question':>11}{'memorise s':>11}{'bytes/token':>12}")
    for name, row in payload["configs"].items():
        vs = f"{100 * row['vs_prompt']:.0f}%" if row["vs_prompt"] is not None else ""
        memorise = f"{row['memorize_seconds']:.1f}" if "memorize_seconds" in row else ""
        size = f"{row['bytes_per_token']:.0f}" if "bytes_per_token" in row else ""
        low, high = row["interval95"]
        print(f"{name:<18}{row['accuracy']:>9.3f}{f'{low:.2f}-{high:.2f}':>14}"
              + "".join(f"{row['by_family'][f]['accuracy']:>9.3f}" for f in families)
              + f"{vs:>10}{row['prompt_tokens']:>11.0f}{row['seconds_per_question']:>11.3f}{memorise:>11}{size:>12}")


def plot_recall(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["configs"])
    fig, (acc, size) = plt.subplots(1, 2, figsize=(11, 4))
    accuracies = [payload["configs"][n]["accuracy"] for n in names]
    errors = [[a - payload["configs"][n]["interval95"][0] for n, a in zip(names, accuracies)],
              [payload["configs"][n]["interval95"][1] - a for n, a in zip(names, accuracies)]]
    acc.bar(names, accuracies, yerr=errors, capsize=3)
    acc.axhline(payload["chance"], linestyle="--", color="gray", label="chance")
    acc.set(ylabel="accuracy (95% interval)", ylim=(0, 1), title=f"Recall of {payload['facts']} facts")
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
