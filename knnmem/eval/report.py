"""Output of `knnmem eval`: a table on stdout, JSON with settings and machine, and a PNG plot."""
from __future__ import annotations

import os
import platform
import time

from .scoring import uses_memory


def faiss_version() -> str | None:
    """FAISS's version, or None where it is not installed (a GPU machine: exact search only)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss.__version__


def environment() -> dict:
    import torch
    import transformers

    return {
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "faiss": faiss_version(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _row(name: str, c: dict, base: float | None, documents: list[str]) -> str:
    change = f"{100 * (c['ppl'] / base - 1):+.1f}%" if base else ""
    per_document = "".join(f"{c['ppl_by_document'][d]:>12.3f}" for d in documents) if len(documents) > 1 else ""
    return f"{name:<14}{c['ppl']:>9.3f}{change:>10}{per_document}{c['tokens']:>9}{c['tokens_per_s']:>10.1f}"


def print_row(result: dict, name: str) -> None:
    """One configuration's row, as soon as it is measured."""
    base = result["configs"].get("none", {}).get("ppl")
    documents = [d["name"] for d in result["documents"]]
    print(f"\n{_row(name, result['configs'][name], base, documents)}", flush=True)


def print_table(result: dict) -> None:
    configs = result["configs"]
    base = configs.get("none", {}).get("ppl")
    documents = [d["name"] for d in result["documents"]]
    print(f"\n{result['model']}: {len(documents)} documents, segments of {result['settings']['segment']}")
    heading = "".join(f"{os.path.basename(d)[:11]:>12}" for d in documents) if len(documents) > 1 else ""
    print(f"{'config':<14}{'ppl':>9}{'vs none':>10}{heading}{'tokens':>9}{'tokens/s':>10}")
    for name, c in configs.items():
        print(_row(name, c, base, documents))


def write_json(path: str, result: dict, quiet: bool = False) -> None:
    """The result with the machine's environment at `path`, atomically (a partial result after
    each configuration is never left half-written)."""
    from ..files import write_json as write_atomically

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomically(path, {**result, "environment": environment()}, indent=2)
    if not quiet:
        print(f"wrote {path}")


def save_plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    segment = result["settings"]["segment"]
    fig, (by_position, by_size) = plt.subplots(1, 2, figsize=(11, 4))
    memory_kinds = sorted({c["kind"] for c in configs.values() if uses_memory(c["kind"])})
    for name, c in configs.items():
        if not uses_memory(c["kind"]) or c["memory"] == result["settings"]["memory"]:
            xs = [segment * (i + 1) for i in range(len(c["ppl_by_segment"]))]
            by_position.plot(xs, c["ppl_by_segment"], marker="o", label=name)
    by_position.set(xlabel="position in document (tokens, end of segment)", ylabel="perplexity",
                    title="Perplexity by position")
    by_position.legend()
    for kind in memory_kinds:  # one line per memory kind (memory, xl+memory) over the sizes run
        sizes = sorted((c["memory"], c["ppl"]) for c in configs.values() if c["kind"] == kind)
        by_size.plot([s for s, _ in sizes], [p for _, p in sizes], marker="o", label=kind)
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
