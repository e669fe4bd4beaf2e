"""Does the memory layer retrieve what a far copy needs? On the known-answer control corpus.

    python benchmarks/control_retrieval.py                  # seed 0, memory 4096 + XL (minutes on 2 cores)
    python benchmarks/control_retrieval.py --memory-position window_start

Trains as `paper_table.py --preset control --pretrain 2000 --steps 500` does (one vanilla model,
then memory + XL from its weights), then reads the held-out documents. For each copied token whose
source has entered memory, the memory layer's top-k search from the position before it should
hold the source token: the key an induction head matches is the token that followed the earlier
occurrence of the current one. Reports, by distance, the fraction of such searches that found the
source in any head (hit rate) beside what k random memories would find (k / memories stored), and
the gates (sigmoid: the weight of memory in each head's output). Prints and writes JSON.
"""
from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import machine_info, write_json  # noqa: E402
from paper_table import PRESETS, configurations, documents, parser, pretrain, trained  # noqa: E402
from knnmem.corpus import recorded_options  # noqa: E402


def retrieval_hits(model, val_docs: list[torch.Tensor], distances: torch.Tensor, segment: int,
                   far: list[int]) -> dict[str, dict[str, float]]:
    """{distance: {"hit_rate", "chance", "searches"}} over the held-out documents, read side by side."""
    layer = next(block.attn for block in model.blocks if hasattr(block.attn, "memory"))
    ids = torch.stack(val_docs)
    found: dict[int, list[float]] = {d: [] for d in far}
    chance: dict[int, list[float]] = {d: [] for d in far}

    def search_as_the_layer_will(module, args) -> None:  # before the forward writes this segment
        memory = module.memory
        if not len(memory):
            return
        q, k, v, valid = module._project(args[0], None)
        q = module.memory_query(q, module._local(q, k, v, valid)[0])
        _, slots = memory.search(q, module.topk)  # (B, H, T, k)
        ordinals = memory.ordinals(slots.clamp(min=0)).masked_fill(slots < 0, -1)
        stored, written = memory.counts, memory.written
        for p in range(q.shape[2]):
            target = offset + p + 1  # the token position p predicts
            if target >= ids.shape[1]:
                break
            for row in range(ids.shape[0]):
                d = int(distances[row, target])
                source = target - d
                in_memory = source < int(written[row]) and (source < memory.pinned or
                                                              source >= int(written[row]) - (memory.max_memories - memory.pinned))
                if d in found and in_memory:
                    found[d].append(float((ordinals[row, :, p] == source).any()))
                    chance[d].append(min(1.0, module.topk * q.shape[1] / int(stored[row])))

    handle = layer.register_forward_pre_hook(search_as_the_layer_will)
    model.eval()
    model.reset_memory()
    try:
        with torch.no_grad():
            for offset in range(0, ids.shape[1], segment):
                model(ids[:, offset:offset + segment])
    finally:
        handle.remove()
        model.reset_memory()
    return {str(d): {"hit_rate": sum(found[d]) / max(1, len(found[d])),
                     "chance": sum(chance[d]) / max(1, len(chance[d])), "searches": len(found[d])} for d in far}


def main() -> None:
    p = parser()
    p.set_defaults(**{**PRESETS["control"], "pretrain": 2000, "steps": 500, "memory_sizes": [4096],
                      "out": "benchmarks/results/control_retrieval_cpu.json"})
    p.add_argument("--config", default="memory-4096+xl", help="the memory configuration to train and probe")
    args = p.parse_args()
    seed = args.seeds[0]
    data = documents(args, seed)
    config, context, refresh = configurations(args)[args.config]
    model, log, seconds = trained(args, config, context, refresh, seed, data, pretrain(args, seed, data[0]))
    layer = next(block.attn for block in model.blocks if hasattr(block.attn, "memory"))
    result = {"machine": machine_info(), "settings": recorded_options(args), "config": args.config,
              "train_seconds": seconds, "gates": torch.sigmoid(layer.gate.detach()).tolist(),
              "memory_scale": layer.memory_scale.detach().tolist(),
              "by_distance": retrieval_hits(model, data[1], data[2], args.segment, args.distances)}
    for d, r in result["by_distance"].items():
        print(f"copies {d:>5} back: source retrieved in {r['hit_rate']:.1%} of {r['searches']} searches "
              f"(k random memories: {r['chance']:.1%})")
    print("gates (sigmoid) per head:", [round(g, 3) for g in result["gates"]])
    write_json(args.out, result)


if __name__ == "__main__":
    main()
