"""Which heads the passkey needs: `knnmem passkey`'s memory configuration with memory in several
sets of heads of the bundled model, on the same keys, in one run.

    python benchmarks/passkey_heads.py [--length 4096] [--depths 0.1 0.5] [--trials 1]
        [--json benchmarks/results/passkey_heads_cpu.json]

Sets: the committed calibration (chosen for perplexity), every head, and every head of the lower
or of the upper half of the layers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_json  # noqa: E402

from knnmem.eval.model import BUNDLED_CALIBRATION, load_model  # noqa: E402
from knnmem.eval.passkey import evaluate_configs  # noqa: E402
from knnmem.hf import attention_modules, head_shape  # noqa: E402
from knnmem.patch import saved_settings  # noqa: E402


def head_sets(model) -> dict[str, list[tuple[int, int]] | None]:
    layers, (heads, _, _) = len(attention_modules(model)), head_shape(model)
    half = layers // 2
    return {
        "calibrated (perplexity)": [tuple(pair) for pair in saved_settings(BUNDLED_CALIBRATION)["heads"]],
        "every head": None,
        f"every head of layers 0-{half - 1}": [(i, h) for i in range(half) for h in range(heads)],
        f"every head of layers {half}-{layers - 1}": [(i, h) for i in range(half, layers) for h in range(heads)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--json", default="benchmarks/results/passkey_heads_cpu.json")
    args = parser.parse_args()
    model, tokenizer, description = load_model()
    rows, every = {}, len(attention_modules(model)) * head_shape(model)[0]
    for name, heads in head_sets(model).items():
        start = time.perf_counter()
        accuracy = evaluate_configs(model, tokenizer, ["memory"], [args.length], args.depths, args.trials,
                                    heads=heads)["memory"][str(args.length)]
        rows[name] = {"heads": every if heads is None else len(heads), "accuracy": accuracy,
                      "seconds": time.perf_counter() - start}
        print(f"{name:<32} {rows[name]['heads']:>4} heads  {accuracy}", flush=True)
    write_json(args.json, {"model": description, "length": args.length, "depths": args.depths,
                           "trials": args.trials, "results": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
