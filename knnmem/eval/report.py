"""Output of `knnmem eval`: a table on stdout, JSON with settings and machine, and a PNG plot."""
from __future__ import annotations

import json
import os
import platform
import time


def environment() -> dict:
    import faiss
    import torch
    import transformers

    return {
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "faiss": faiss.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def print_table(result: dict) -> None:
    configs = result["configs"]
    base = configs.get("none", {}).get("ppl")
    print(f"\n{result['model']}: {len(result['documents'])} documents, segments of {result['settings']['segment']}")
    print(f"{'config':<14}{'ppl':>9}{'vs none':>10}{'tokens':>9}{'tokens/s':>10}")
    for name, c in configs.items():
        change = f"{100 * (c['ppl'] / base - 1):+.1f}%" if base else ""
        print(f"{name:<14}{c['ppl']:>9.3f}{change:>10}{c['tokens']:>9}{c['tokens_per_s']:>10.1f}")


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**result, "environment": environment()}, f, indent=2)
    print(f"wrote {path}")


def save_plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    segment = result["settings"]["segment"]
    fig, (by_position, by_size) = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in configs.items():
        if c["kind"] != "memory" or c["memory"] == result["settings"]["memory"]:
            xs = [segment * (i + 1) for i in range(len(c["ppl_by_segment"]))]
            by_position.plot(xs, c["ppl_by_segment"], marker="o", label=name)
    by_position.set(xlabel="position in document (tokens, end of segment)", ylabel="perplexity",
                    title="Perplexity by position")
    by_position.legend()
    sizes = sorted((c["memory"], c["ppl"]) for c in configs.values() if c["kind"] == "memory")
    if sizes:
        by_size.plot([s for s, _ in sizes], [p for _, p in sizes], marker="o", label="memory")
        by_size.set_xscale("log", base=2)
    for name, style in (("none", "--"), ("long", ":"), ("xl", "-.")):
        if name in configs:
            by_size.axhline(configs[name]["ppl"], linestyle=style, color="gray", label=name)
    by_size.set(xlabel="memory size (tokens per layer and head)", ylabel="perplexity", title="Perplexity by memory size")
    if by_size.get_legend_handles_labels()[0]:  # nothing to show with a single configuration
        by_size.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
