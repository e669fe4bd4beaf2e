"""The retrofit on the real SmolLM2-135M: exactness with an empty memory, and cost per segment.

    python benchmarks/bench_patch.py

1. Max |logits difference| between the unpatched model and the model patched (all 30 layers)
   with an empty memory, on a 512-token segment of real text.
2. Wall time of one 512-token segment: unpatched, and patched with memories already holding
   8K and 64K tokens per layer and KV head, side by side in one run (best of --repeat). The 8K
   memory is filled by streaming the document itself; the 64K one by the document's keys
   repeated with small noise (streaming 64K tokens through the model would take ~7 minutes
   and time the same search).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import machine_info, timed, write_json  # noqa: E402
from knnmem.corpus import recorded_options  # noqa: E402

import knnmem  # noqa: E402
from knnmem import corpus  # noqa: E402
from knnmem.eval.model import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segment", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", nargs="*", default=["exact", "ivf"], help="none: empty-memory part only")
    parser.add_argument("--out", default="benchmarks/results/patch_cpu.json")
    args = parser.parse_args()
    model, tokenizer, name = load_model()
    text = corpus.read_text(os.path.join(corpus.stdlib_directory(), "typing.py"))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    n = args.segment
    segments = ids[:, : (8192 // n + 1) * n].split(n, dim=1)
    probe = segments[-1]
    result = {"model": name, "segment": n}
    with torch.no_grad():
        plain = model(probe).logits
        result["unpatched_s"] = timed(lambda: model(probe), repeat=args.repeat)
        handle = knnmem.patch(model)
        result["empty_memory_max_abs_logit_diff"] = (model(probe).logits - plain).abs().max().item()
        handle.reset()  # that call wrote the probe: time with the memory empty
        with handle.frozen():  # read-only: every timed call sees the same memory
            result["patched_empty_memory_s"] = timed(lambda: model(probe), repeat=args.repeat)
        print(f"empty-memory patch: max |logit diff| {result['empty_memory_max_abs_logit_diff']:.2e}; "
              f"unpatched {result['unpatched_s']:.2f} s, patched (empty) {result['patched_empty_memory_s']:.2f} s")
        knnmem.unpatch(model)
        result["memories"] = {}
        for backend in args.backends:
            handle = knnmem.patch(model, max_memories=65536, memory_backend=backend)
            for segment in segments[:-1]:  # 8K tokens of the document itself
                model(segment)
            with handle.frozen():
                seconds_8k = timed(lambda: model(probe), repeat=args.repeat)
            g = torch.Generator().manual_seed(0)
            for memory in handle.memories.values():  # grow every store to 64K
                stored_k, stored_v = memory.keys[:, :, :8192].clone(), memory.values[:, :, :8192].clone()
                for _ in range(7):
                    noise = 0.05 * torch.randn(stored_k.shape, generator=g) * stored_k.std()
                    memory.add(stored_k + noise, stored_v)
            with handle.frozen():
                seconds_64k = timed(lambda: model(probe), repeat=args.repeat)
            label = next(iter(handle.memories.values())).backend
            result["memories"][label] = {"8K_s": seconds_8k, "64K_s": seconds_64k}
            print(f"{label:<28} 8K: {seconds_8k:.2f} s ({seconds_8k / result['unpatched_s']:.1f}x)   "
                  f"64K: {seconds_64k:.2f} s ({seconds_64k / result['unpatched_s']:.1f}x)", flush=True)
            knnmem.unpatch(model)
    write_json(args.out, {"machine": machine_info(), "parameters": recorded_options(args), **result})


if __name__ == "__main__":
    main()
