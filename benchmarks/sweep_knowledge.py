"""Knowledge-memory settings on the recall task, measured on facts of another seed than the report's.

    python benchmarks/sweep_knowledge.py                 # seed 1, 64 facts, the variants below
    python benchmarks/sweep_knowledge.py --seed 3 --facts 32

Each variant patches the bundled SmolLM2-135M, memorises the documents (as one text, or each alone),
and answers every question from knowledge with memory frozen (`knnmem.eval.recall`). Prints and
saves accuracy per variant (JSON with machine and versions). `knnmem eval --task recall` uses the
best of these (top-k 16, all layers, constant distance 512, one text).
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from knnmem import patch, unpatch
from knnmem.eval.model import load_model
from knnmem.eval.recall import DEFAULT_FAMILIES, accuracy, all_facts, documents, questions
from knnmem.eval.report import write_json
from knnmem.knowledge import Storage

# (name, patch options, memorise as one text?, storage)
VARIANTS = [
    ("documents alone, top-k 32", {}, False, Storage()),
    ("top-k 32", {}, True, Storage()),
    ("top-k 8", {"topk": 8}, True, Storage()),
    ("top-k 12", {"topk": 12}, True, Storage()),
    ("top-k 16", {"topk": 16}, True, Storage()),
    ("top-k 24", {"topk": 24}, True, Storage()),
    ("top-k 16, distance 256", {"topk": 16, "distance": 256}, True, Storage()),
    ("top-k 16, distance 1024", {"topk": 16, "distance": 1024}, True, Storage()),
    ("top-k 16, position start", {"topk": 16, "position": "start"}, True, Storage()),
    ("top-k 16, position none", {"topk": 16, "position": "none"}, True, Storage()),
    ("top-k 16, layers 0-14", {"topk": 16, "layers": list(range(15))}, True, Storage()),
    ("top-k 16, layers 5-29", {"topk": 16, "layers": list(range(5, 30))}, True, Storage()),
    ("top-k 16, sparse 8/128", {"topk": 16}, True, Storage("sparse")),
    ("top-k 16, sparse 32/128", {"topk": 16}, True, Storage("sparse", keep=32)),
    ("top-k 16, pq 16 x 8 bits", {"topk": 16}, True, Storage("pq")),
    ("top-k 16, pq 32 x 8 bits", {"topk": 16}, True, Storage("pq", pq_m=32)),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--facts", type=int, default=32, help="facts of each family (unicode, html, errno)")
    p.add_argument("--json", default="benchmarks/results/sweep_knowledge_cpu.json")
    args = p.parse_args()
    model, tokenizer, description = load_model()
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    facts = all_facts(DEFAULT_FAMILIES, args.facts, args.seed)
    texts = documents(facts, 8, args.seed)
    asked = questions(facts, 4, args.seed)
    alone = [torch.tensor(encode(t)) for t in texts]
    corpus = [torch.tensor(encode("\n\n".join(texts)))]
    bar = tqdm(total=len(VARIANTS) * len(asked), unit="question")
    rows = []
    for name, options, as_corpus, storage in VARIANTS:
        bar.set_description(name)
        handle = patch(model, max_memories=1024, **options)  # questions are read with memory frozen
        start = time.perf_counter()
        handle.memorize(corpus if as_corpus else alone, storage=storage, progress=False)
        with handle.frozen():
            result = accuracy(model, encode, asked, [], bar)
        rows.append({"variant": name, "options": options, "memorised_as": "corpus" if as_corpus else "documents",
                     "storage": storage.describe(), "accuracy": result["accuracy"],
                     "interval95": result["interval95"], "by_family": result["by_family"],
                     "seconds": time.perf_counter() - start})
        unpatch(model)
    bar.close()
    for row in rows:
        print(f"{row['variant']:<32}{row['accuracy']:>7.3f}")
    write_json(args.json, {"model": description, "facts": args.facts, "seed": args.seed, "variants": rows})


if __name__ == "__main__":
    main()
