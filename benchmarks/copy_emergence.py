"""When does copying emerge? knnmem's `MemorizingTransformer` beside a plain reference transformer
written here in a few lines of torch (no knnmem code), on the same copy task, in one run.

    python benchmarks/copy_emergence.py                    # one sparse span per row: 1,500 steps each (about 15 minutes)
    python benchmarks/copy_emergence.py --corpus motifs --repeats 3 --vocab 64 --dim 64 --heads 2 --lr 3e-3
    python benchmarks/copy_emergence.py --steps 20000 --batch-size 64 --device cuda
    python benchmarks/copy_emergence.py --distance 48 --steps 400 --batch-size 16 --models knnmem  # by position

Two tasks. `spans` (the first control's mechanism, in one segment): sequences of `--length` random
tokens in which one span of `--span` tokens recurs at a random distance in [span, 2 span]. `motifs`
(the control corpus now, `knnmem.synthetic.repeated_motifs` without far recurrences): windows of
`--length` tokens cut at random from documents of random motifs of `--motif` tokens, each written
`--repeats` times in a row; scored: the copies whose source lies inside the window. A copied token
can be predicted only by finding where the previous token occurred before (an induction circuit:
a previous-token head, then a content match); a fixed distance could be learnt by position alone,
which kNN memories (stored without positions) cannot use. Both models: vanilla (no memory, no XL),
the same width, depth, heads, RoPE, pre-norm, tied embeddings, init and optimizer. Reported every
`--every` steps: the mean loss on copied tokens and on the rest (chance: ln vocab).
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import machine_info, write_json  # noqa: E402
from knnmem.corpus import recorded_options  # noqa: E402

from knnmem import MemorizingConfig, MemorizingTransformer  # noqa: E402
from knnmem.positions import apply_rotary, rope_angles  # noqa: E402
from knnmem.synthetic import repeated_motifs  # noqa: E402


class ReferenceBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        cos, sin = rope_angles(T, dim // self.heads, 10000.0, device=x.device)
        attn = F.scaled_dot_product_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(B, T, dim))
        return x + self.mlp(self.norm2(x))


class ReferenceLM(nn.Module):
    """A plain pre-norm decoder (torch sdpa), the shape of a vanilla MemorizingTransformer."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(ReferenceBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


MOTIF_DOCUMENT = 8192  # tokens per motifs document the windows are cut from
MOTIF_DOCUMENTS = 64


def motif_documents(args, g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [repeated_motifs(MOTIF_DOCUMENT, args.vocab, [], tuple(args.motif), args.repeats, 0.0, g)
            for _ in range(MOTIF_DOCUMENTS)]


def motif_batch(args, documents, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, length), copied (B, length) bool): random windows of the motif documents; copied:
    the tokens whose copy source lies inside the window."""
    rows = torch.randint(len(documents), (args.batch_size,), generator=g).tolist()
    starts = torch.randint(MOTIF_DOCUMENT - args.length + 1, (args.batch_size,), generator=g).tolist()
    ids = torch.stack([documents[r][0][s:s + args.length] for r, s in zip(rows, starts)])
    distance = torch.stack([documents[r][1][s:s + args.length] for r, s in zip(rows, starts)])
    return ids, (distance > 0) & (distance <= torch.arange(args.length))


def batch(args, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, length), copied (B, length) bool): one recurring span per row."""
    ids = torch.randint(args.vocab, (args.batch_size, args.length), generator=g)
    copied = torch.zeros_like(ids, dtype=torch.bool)
    for row in range(args.batch_size):
        d = args.distance or int(torch.randint(args.span, 2 * args.span + 1, (1,), generator=g))
        start = int(torch.randint(d, args.length - args.span + 1, (1,), generator=g))
        ids[row, start:start + args.span] = ids[row, start - d:start - d + args.span]
        copied[row, start + 1:start + args.span] = True
    return ids, copied


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--corpus", choices=["spans", "motifs"], default="spans")
    p.add_argument("--span", type=int, default=32, help="spans: tokens of the recurring span")
    p.add_argument("--motif", type=int, nargs=2, default=[8, 24], metavar=("SHORTEST", "LONGEST"),
                   help="motifs: tokens per motif")
    p.add_argument("--repeats", type=int, default=3, help="motifs: times each motif is written in a row")
    p.add_argument("--distance", type=int, default=0,
                   help="spans: a fixed distance back (learnable by position alone); 0: random in [span, 2 span]")
    p.add_argument("--models", nargs="+", choices=["knnmem", "reference"], default=["knnmem", "reference"])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/copy_emergence_cpu.json")
    args = p.parse_args()
    if args.corpus == "spans" and not 3 * args.span <= args.length:
        p.error(f"--length must be at least 3 x --span ({3 * args.span}), got {args.length}")
    if args.distance and args.corpus == "motifs":
        p.error("--distance is an option of --corpus spans")
    if args.distance and not args.span <= args.distance <= args.length - args.span:
        p.error(f"--distance must be in [--span, --length - --span], got {args.distance}")
    models = {
        "knnmem": lambda: MemorizingTransformer(MemorizingConfig(vocab_size=args.vocab, dim=args.dim, depth=args.depth,
                                                                 heads=args.heads, memory_layers=[])),
        "reference": lambda: ReferenceLM(args.vocab, args.dim, args.depth, args.heads),
    }
    result = {"machine": machine_info(), "settings": recorded_options(args), "chance": math.log(args.vocab), "models": {}}
    for name, make in models.items():
        if name not in args.models:
            continue
        torch.manual_seed(args.seed)
        model = make().to(args.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        g = torch.Generator().manual_seed(args.seed)  # the same batches for both models
        documents = motif_documents(args, g) if args.corpus == "motifs" else None
        curve, start, window = [], time.perf_counter(), []
        for step in range(1, args.steps + 1):
            made = batch(args, g) if documents is None else motif_batch(args, documents, g)
            ids, copied = (t.to(args.device) for t in made)
            logits = model(ids)
            logits = logits.logits if hasattr(logits, "logits") else logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, args.vocab), ids[:, 1:].reshape(-1),
                                   reduction="none").view(ids.shape[0], -1)
            loss.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mask = copied[:, 1:]
            window.append((loss[mask].mean().item(), loss[~mask].mean().item()))
            if step % args.every == 0:
                copy_loss, rest = (sum(x) / len(x) for x in zip(*window))
                curve.append({"step": step, "copy_loss": copy_loss, "rest_loss": rest,
                              "seconds": time.perf_counter() - start})
                window = []
                print(f"{name:>9} step {step:>6}: copy loss {copy_loss:.3f}, rest {rest:.3f} "
                      f"({curve[-1]['seconds']:.0f} s)", flush=True)
        result["models"][name] = {"curve": curve, "parameters": sum(q.numel() for q in model.parameters())}
        write_json(args.out, result)


if __name__ == "__main__":
    main()
