"""The paper's table, from scratch: train each configuration with the same budget, in one run,
and report held-out perplexity (and, on the control corpus, the loss on copied tokens by distance).

    python benchmarks/paper_table.py                          # real bytes, CPU scale (--preset cpu)
    python benchmarks/paper_table.py --preset control --seeds 0 1 2   # the known-answer control
    python benchmarks/paper_table.py --preset curve           # validation perplexity against tokens
    python benchmarks/paper_table.py --preset gpu             # the GPU suite's rows (one H100/H200)

Configurations (Wu et al. 2022, Table 4's rows at a size that fits the budget):
- vanilla: local attention over each segment alone.
- xl: plus a Transformer-XL cache of the previous segment.
- wide-Nx: a vanilla model whose window is N segments (the segment plus a recomputed context).
- memory-<M>+xl: XL cache plus one kNN memory layer at 75% depth holding M tokens.
- NAME-fresh (--fresh): the same XL model trained with its cache recomputed by the current weights
  before each segment (`TrainSettings.refresh_cache`); the cache of `xl` is one optimizer step old.
With `--pretrain N`, one vanilla model is trained N steps first and every configuration starts from
its weights (the memory layers' gate and scale from their init), then trains `--steps` more: the
Focused Transformer's recipe (a model that already copies locally, then its memory).

Corpora: `bytes` (the standard library's largest .py files as UTF-8 bytes, pieces of
`--doc-tokens`, train/validation split by file) or `motifs` (`knnmem.synthetic.repeated_motifs`:
random motifs of `--motif` tokens, each repeated `--repeats` times in a row, where copying is
learnt; a fraction `--recurring` of them recur from exactly `--distances` back, generated from
the seed; such a copy can only be predicted by looking back its distance, so the loss on copies
at distance d says whether a model reaches d; `local` is the loss on the repeats). Every model is
a `knnmem.MemorizingTransformer` trained by `knnmem.train.train` on documents read segment by
segment with memory cleared per document. Prints a table and writes JSON (+ PNG) after every configuration.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import machine_info, write_json  # noqa: E402
from knnmem.corpus import recorded_options  # noqa: E402

from knnmem import MemorizingConfig, MemorizingTransformer  # noqa: E402
from knnmem import corpus  # noqa: E402
from knnmem.corpus import document_pieces  # noqa: E402
from knnmem.synthetic import repeated_motifs  # noqa: E402
from knnmem.train import TrainSettings, token_losses, train  # noqa: E402

# The paper's numbers for these rows (perplexity, 12-layer models, Table 4 / Figure 1), quoted
# for comparison: vanilla -> XL -> memory 65K + XL.
PAPER = {"arxiv": {"vanilla": 3.29, "xl": 2.67, "memory-65536+xl": 2.31},
         "pg19": {"vanilla": 13.71, "xl": 12.34, "memory-65536+xl": 11.62}}

# The known-answer control (--preset control): its corpus, models and CPU budget. Small enough that
# copying emerges within the budget on 2 cores (a 2-layer model learns it from the local repeats).
CONTROL = dict(corpus="motifs", vocab=64, dim=64, depth=2, heads=2, motif=[8, 24], repeats=6, recurring=0.5,
               distances=[192, 768, 3072], memory_sizes=[1024, 4096],
               configs=["vanilla", "xl", "memory-1024+xl", "memory-4096+xl"],
               batch_size=32, steps=2000, max_docs=1000, val_docs=16, warmup=50, lr=3e-3)

PRESETS = {
    "cpu": {},  # the defaults below: real bytes, 0.8M parameters, minutes per configuration on 2 cores
    # the known answer: every model can learn to copy within its segment; only its reach differs
    "control": CONTROL,
    # the control at 3x the steps and 2x the width (one H100/H200, a few minutes)
    "control-gpu": {**CONTROL, "dim": 128, "heads": 4, "steps": 6000, "max_docs": 3000, "val_docs": 32, "warmup": 100},
    # the budget curve on real bytes: validation along the way, 4x the default budget
    "curve": dict(steps=1600, validate_every=200, configs=["vanilla", "xl", "wide-2x", "memory-1536+xl"], wide=2,
                  max_docs=1000),
    # one H100/H200, a few minutes in all (the GPU suite): wider, deeper, longer segments and documents
    "gpu": dict(dim=384, depth=8, heads=6, segment=512, batch_size=16, steps=300, doc_tokens=16384, fresh=True,
                memory_sizes=[8192], configs=["vanilla", "xl", "memory-8192+xl", "xl-fresh", "memory-8192+xl-fresh"],
                max_docs=400, val_docs=16, warmup=30, lr=1e-3),
    # the GPU suite's rehearsal on a CPU: every code path, tiny
    "rehearse": dict(dim=32, depth=2, heads=2, segment=32, batch_size=2, steps=4, doc_tokens=256, memory_sizes=[128],
                     configs=["vanilla", "xl", "memory-128+xl"], max_docs=8, val_docs=2, warmup=1),
}


def utf8_bytes(text: str) -> list[int]:
    """The byte-level tokenizer: UTF-8 bytes (vocab 256)."""
    return list(text.encode("utf-8"))


def configurations(args) -> dict[str, tuple[MemorizingConfig, int, bool]]:
    """name -> (model config, local context of the reader, refresh the XL cache in training)."""
    base = dict(vocab_size=args.vocab, dim=args.dim, depth=args.depth, heads=args.heads, topk=args.topk,
                memory_position=args.memory_position, nope_layers=args.nope_layers)
    configs = {
        "vanilla": (MemorizingConfig(**base, memory_layers=[]), 0, False),
        "xl": (MemorizingConfig(**base, memory_layers=[], xl_cache=True), 0, False),
        f"wide-{args.wide}x": (MemorizingConfig(**base, memory_layers=[]), (args.wide - 1) * args.segment, False),
    }
    for size in args.memory_sizes:
        configs[f"memory-{size}+xl"] = (MemorizingConfig(**base, max_memories=size, xl_cache=True), 0, False)
    if args.fresh:  # the same models trained with caches recomputed by the current weights
        configs.update({f"{name}-fresh": (config, context, True) for name, (config, context, _) in list(configs.items())
                        if config.xl_cache})
    return configs


def documents(args, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """(training documents, validation documents, validation copy distances (n, doc_tokens) or None)."""
    if args.corpus == "bytes":
        train_paths, validation_paths = corpus.split(corpus.training_corpus())
        return (document_pieces(train_paths, utf8_bytes, args.doc_tokens, args.max_docs),
                document_pieces(validation_paths, utf8_bytes, args.doc_tokens, args.val_docs), None)
    g = torch.Generator().manual_seed(seed)
    make = lambda: repeated_motifs(args.doc_tokens, args.vocab, args.distances, tuple(args.motif), args.repeats,  # noqa: E731
                                   args.recurring, g)
    train_docs = [make()[0] for _ in range(args.max_docs)]
    validation = [make() for _ in range(args.val_docs)]
    return train_docs, [t for t, _ in validation], torch.stack([d for _, d in validation])


def scores(losses: torch.Tensor, distances: torch.Tensor | None, distance_list: list[int], longest_motif: int) -> dict:
    """Held-out perplexity; on the control corpus also the mean loss (nats) of the local repeats
    (copies at most `longest_motif` back), of the recurrences at each distance, and of the
    rest. losses: (n, N - 1) from token_losses."""
    result = {"validation_ppl": math.exp(losses.double().mean().item())}
    if distances is not None:
        scored = distances[:, 1:]  # losses[:, j - 1] scores token j
        local = (scored > 0) & (scored <= longest_motif)
        result["copy_loss_by_distance"] = {"local": losses[local].mean().item(),
                                           **{str(d): losses[scored == d].mean().item() for d in distance_list}}
        result["rest_loss"] = losses[scored == 0].mean().item()
    return result


def pretrain(args, seed: int, train_docs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of the vanilla model after `--pretrain` steps (the start of every configuration)."""
    torch.manual_seed(seed)
    model = MemorizingTransformer(configurations(args)["vanilla"][0]).to(args.device)
    train(model, train_docs, TrainSettings(steps=args.pretrain, lr=args.lr, lr_memory=None, warmup=args.warmup,
                                           batch_size=args.batch_size, segment=args.segment, validate_every=0,
                                           save_every=0, seed=seed))
    return model.state_dict()


def start_from(model: MemorizingTransformer, weights: dict[str, torch.Tensor]) -> None:
    """Load the pretrained vanilla weights; only the memory layers' own gate and scale keep their init."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not name.endswith((".gate", ".memory_scale")) for name in missing):
        raise RuntimeError(f"pretrained weights do not fit: missing {missing}, unexpected {unexpected}")


def trained(args, config: MemorizingConfig, context: int, refresh: bool, seed: int, data,
            weights: dict[str, torch.Tensor] | None = None) -> tuple[MemorizingTransformer, dict, float]:
    """(model, training log, seconds): one configuration trained `--steps` (from `weights` if given)."""
    train_docs, val_docs, _ = data
    torch.manual_seed(seed)
    model = MemorizingTransformer(config).to(args.device)
    if weights is not None:
        start_from(model, weights)
    settings = TrainSettings(steps=args.steps, lr=args.lr, lr_memory=None, warmup=args.warmup,
                             batch_size=args.batch_size, segment=args.segment, context=context,
                             validate_every=args.validate_every, save_every=0, seed=seed, refresh_cache=refresh)
    start = time.perf_counter()
    log = train(model, train_docs, settings, validation_documents=val_docs if args.validate_every else None)
    return model, log, time.perf_counter() - start


def train_one(args, config: MemorizingConfig, context: int, refresh: bool, seed: int, data,
              weights: dict[str, torch.Tensor] | None = None) -> dict:
    _, val_docs, val_distances = data
    model, log, seconds = trained(args, config, context, refresh, seed, data, weights)
    losses = token_losses(model, val_docs, args.segment, context, args.batch_size)
    tokens_per_step = args.batch_size * args.segment
    return {
        **scores(losses, val_distances, args.distances, args.motif[1]), "seed": seed,
        "train_tokens": log["tokens"], "train_seconds": seconds, "train_tokens_per_s": log["tokens"] / seconds,
        "final_train_loss": sum(log["history"][-20:]) / len(log["history"][-20:]), "loss_history": log["history"],
        "validation_curve": [{"train_tokens": v["step"] * tokens_per_step, "ppl": v["ppl"]} for v in log["validation"]],
    }


def summarise(runs: list[dict]) -> dict:
    """Mean and (with several seeds) sample standard deviation of the numbers of each seed's run."""
    out = {}
    keys = ["validation_ppl", "train_seconds", "train_tokens_per_s", "final_train_loss", "rest_loss"]
    for key in keys:
        if key in runs[0]:
            values = [r[key] for r in runs]
            out[key] = statistics.fmean(values)
            out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else None
    if "copy_loss_by_distance" in runs[0]:
        out["copy_loss_by_distance"] = {d: statistics.fmean(r["copy_loss_by_distance"][d] for r in runs)
                                        for d in runs[0]["copy_loss_by_distance"]}
        out["copy_loss_by_distance_std"] = {d: statistics.stdev(r["copy_loss_by_distance"][d] for r in runs)
                                            if len(runs) > 1 else None for d in runs[0]["copy_loss_by_distance"]}
    return out


def print_table(result: dict) -> None:
    configs = result["configs"]
    first = next(iter(configs.values()))["summary"]
    distances = list(first.get("copy_loss_by_distance", {}))
    header = f"{'config':>18} {'ppl':>9} " + "".join(f"{'copy@' + d:>11}" for d in distances) + \
        (f"{'rest':>8}" if distances else "") + f" {'train s':>8}"
    print("\n" + header)
    for name, c in configs.items():
        s = c["summary"]
        pm = lambda m, sd: f"{m:.3f}" + (f"±{sd:.2f}" if sd else "")  # noqa: E731
        row = f"{name:>18} {pm(s['validation_ppl'], s['validation_ppl_std']):>9} "
        row += "".join(f"{pm(s['copy_loss_by_distance'][d], s['copy_loss_by_distance_std'][d]):>11}" for d in distances)
        row += f"{s['rest_loss']:8.3f}" if distances else ""
        print(row + f" {s['train_seconds']:8.0f}")


def save_plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    curves = any(run["validation_curve"] for c in configs.values() for run in c["seeds"])
    copies = "copy_loss_by_distance" in next(iter(configs.values()))["summary"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if copies:  # the control: loss on copied tokens against how far back their copy is
        for name, c in configs.items():
            d = c["summary"]["copy_loss_by_distance"]
            longest = result["settings"]["motif"][1]  # the local repeats, plotted at their farthest
            left.plot([longest if k == "local" else int(k) for k in d], list(d.values()), marker="o", label=name)
        left.axhline(math.log(result["settings"]["vocab"]), color="gray", ls=":", label="chance")
        left.set(xscale="log", xlabel="distance back to the copy (tokens)", ylabel="held-out loss on copied tokens (nats)")
        left.legend()
    else:
        names = list(configs)
        left.bar(names, [configs[n]["summary"]["validation_ppl"] for n in names], color="tab:blue")
        left.set_ylabel("held-out perplexity")
        left.set_ylim(min(c["summary"]["validation_ppl"] for c in configs.values()) * 0.95)
        left.tick_params(axis="x", rotation=20)
    for name, c in configs.items():
        run = c["seeds"][0]
        if curves:
            right.plot([v["train_tokens"] for v in run["validation_curve"]], [v["ppl"] for v in run["validation_curve"]],
                       marker="o", label=name)
        else:
            history = run["loss_history"]
            k = max(1, len(history) // 50)
            smooth = [sum(history[i:i + k]) / len(history[i:i + k]) for i in range(0, len(history), k)]
            right.plot([i * k for i in range(len(smooth))], smooth, label=name)
    right.set(xlabel="training tokens" if curves else "step",
              ylabel="held-out perplexity" if curves else "training loss (nats per token)")
    right.legend()
    s = result["settings"]
    fig.suptitle(f"From scratch, {s['corpus']}, same budget: {s['steps']} steps x {s['batch_size']} x {s['segment']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="defaults for the flags below")
    p.add_argument("--corpus", choices=["bytes", "motifs"], default="bytes")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary (bytes: 256)")
    p.add_argument("--distances", type=int, nargs="+", default=[192, 768, 3072],
                   help="motifs corpus: how far back motifs recur (cycled; each above the longest motif)")
    p.add_argument("--motif", type=int, nargs=2, default=[8, 24], metavar=("SHORTEST", "LONGEST"),
                   help="motifs corpus: tokens per motif")
    p.add_argument("--repeats", type=int, default=3, help="motifs corpus: times each motif is written in a row")
    p.add_argument("--recurring", type=float, default=0.25, help="motifs corpus: fraction of motifs that recur from afar")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--segment", type=int, default=128)
    p.add_argument("--wide", type=int, default=4, help="window of the wide vanilla model, in segments")
    p.add_argument("--memory-sizes", type=int, nargs="*", default=[1536, 8192])
    p.add_argument("--memory-position", choices=["none", "window_start"], default="none",
                   help="where memory layers read their memories (MemorizingConfig.memory_position)")
    p.add_argument("--nope-layers", type=int, nargs="*", default=[],
                   help="layers without rotary positions in every configuration (MemorizingConfig.nope_layers)")
    p.add_argument("--configs", nargs="*", default=None, help="names to run, in this order (default: all)")
    p.add_argument("--fresh", action="store_true",
                   help="also every XL configuration trained with its cache recomputed by the current weights (NAME-fresh)")
    p.add_argument("--doc-tokens", type=int, default=8192, help="tokens per training/validation document")
    p.add_argument("--max-docs", type=int, default=400)
    p.add_argument("--val-docs", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--pretrain", type=int, default=0,
                   help="first train one vanilla model this many steps; every configuration starts from its weights")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--validate-every", type=int, default=0, help="steps between validations (the curve; 0: at the end)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="model init, data order and synthetic data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/paper_table_<preset>.json)")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    return p


def main() -> None:
    p = parser()
    preset = p.parse_known_args()[0].preset
    p.set_defaults(**PRESETS[preset])
    args = p.parse_args()
    if args.corpus == "bytes" and args.vocab != 256:
        p.error(f"--vocab: the bytes corpus has 256 symbols, got {args.vocab}")
    configs = configurations(args)
    unknown = set(args.configs or []) - set(configs)
    if unknown:
        p.error(f"--configs: unknown {sorted(unknown)}; choose from {list(configs)}")
    out = args.out or f"benchmarks/results/paper_table_{preset}.json"
    result = {"machine": machine_info(), "settings": recorded_options(args), "paper": PAPER, "configs": {}}
    for seed in args.seeds:
        data = documents(args, seed)
        weights = pretrain(args, seed, data[0]) if args.pretrain else None
        result["documents"] = {"train": len(data[0]), "validation": len(data[1]), "tokens_each": args.doc_tokens}
        print(f"seed {seed}: {len(data[0])} training / {len(data[1])} validation documents of {args.doc_tokens} "
              f"tokens; {args.steps} steps of {args.batch_size} x {args.segment} tokens each", flush=True)
        for name in args.configs or configs:  # in the order asked for
            config, context, refresh = configs[name]
            run = train_one(args, config, context, refresh, seed, data, weights)
            entry = result["configs"].setdefault(name, {
                "context": context, "memory_layers": config.resolved_memory_layers(),
                "max_memories": config.max_memories if config.resolved_memory_layers() else 0,
                "xl_cache": config.xl_cache, "refresh_cache": refresh, "parameters": sum(p.numel() for p in MemorizingTransformer(config).parameters()),
                "seeds": []})
            entry["seeds"].append(run)
            entry["summary"] = summarise(entry["seeds"])
            copies = " ".join(f"copy@{d} {v:.3f}" for d, v in run.get("copy_loss_by_distance", {}).items())
            print(f"{name:>18} seed {seed}: validation ppl {run['validation_ppl']:.4f} {copies} "
                  f"({run['train_seconds']:.0f} s)", flush=True)
            write_json(out, result)  # after every configuration: a long run keeps what it finished
    print_table(result)
    if args.plot:
        save_plot(result, os.path.splitext(out)[0] + ".png")


if __name__ == "__main__":
    main()
