"""`knnmem calibrate`: choose the heads that read memory, on calibration documents (training-free).

    knnmem calibrate --output runs/calibration          # bundled SmolLM2-135M, stdlib calibration documents
    knnmem calibrate --counts 8 16 32 --max-tokens 8192 --output DIR
    knnmem eval --heads DIR                             # memory configs read memory in those heads only

Scores every (layer, head) by how much its output depends on what lies beyond its sinks and local
window (`knnmem.eval.calibration`), then measures xl+memory with the top-N heads for each N of
--counts (and with every head) up to --max-heads (64) on the same calibration documents, and keeps
the fewest heads within --tolerance (1%) of the lowest perplexity (each head with memory runs an
exact search over the whole memory: the budget bounds that cost). Writes
DIR/knnmem_patch.safetensors (`knnmem.load_patch`) and DIR/calibration.json (scores, perplexities).
The calibration documents are never the eval's (`knnmem.corpus.CALIBRATION_DOCUMENTS`).
"""
from __future__ import annotations

import argparse
import os

import torch

from .. import corpus
from ..eval.calibration import DEFAULT_MAX_HEADS, DEFAULT_TOLERANCE, calibrate
from ..eval.report import environment
from ..files import write_json
from ..patch import patch, save_patch, unpatch
from .common import HelpFormatter, check_positive, check_results_writable, default_device, finite_float, load_or_exit

CALIBRATION_FILE = "calibration.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnmem calibrate", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default=None,
                   help="local Hugging Face model directory, or a Hub id in the local cache (default: bundled "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--data", nargs="+", default=None,
                   help="calibration files (default: the standard library's " +
                        ", ".join(corpus.CALIBRATION_DOCUMENTS.values()) + ", the latter from token "
                        f"{corpus.CALIBRATION_PROSE_START} on)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens read from each document (default 16384)")
    p.add_argument("--counts", type=int, nargs="+", default=[8, 16, 32, 64],
                   help="numbers of heads to try (default: 8 16 32 64; every head is tried too)")
    p.add_argument("--segment", type=int, default=512, help="tokens per segment (default 512)")
    p.add_argument("--max-heads", type=int, default=DEFAULT_MAX_HEADS,
                   help="the most heads a candidate may have (default 64; every head is a candidate only if it "
                        "fits)")
    p.add_argument("--tolerance", type=finite_float, default=DEFAULT_TOLERANCE,
                   help="keep the fewest heads whose perplexity is within this fraction of the best (default 0.01)")
    p.add_argument("--output", default="runs/calibration", help="directory of the results (default runs/calibration)")
    p.add_argument("--device", default=default_device())
    return p


def calibration_documents(tokenizer, data: list[str] | None, max_tokens: int) -> list[torch.Tensor]:
    """Token ids of the calibration documents, each cut to `max_tokens`."""
    def ids_of(path: str, start: int = 0) -> torch.Tensor:
        ids = tokenizer(corpus.read_text(path), add_special_tokens=False).input_ids
        return torch.tensor(ids[start:start + max_tokens])

    if data:
        return [ids_of(path) for path in corpus.find_documents(data)]
    paths = corpus.stdlib_documents(corpus.CALIBRATION_DOCUMENTS)
    return [ids_of(paths["code"]), ids_of(paths["prose"], corpus.CALIBRATION_PROSE_START)]


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, "max_tokens", "segment", "max_heads")
    if min(args.counts) > args.max_heads:
        parser.error(f"--counts {args.counts}: none fits --max-heads {args.max_heads}")
    if any(n <= 0 for n in args.counts):
        parser.error(f"--counts must be positive integers, got {args.counts}")
    if not 0 <= args.tolerance < 1:
        parser.error(f"--tolerance must be a fraction in [0, 1), got {args.tolerance}")
    if args.max_tokens < 2 * args.segment:
        parser.error(f"--max-tokens ({args.max_tokens}) must hold at least two segments of --segment {args.segment}")
    check_results_writable(parser, [os.path.join(args.output, CALIBRATION_FILE)])
    try:
        corpus.find_documents(args.data) if args.data else None
    except FileNotFoundError as err:
        parser.error(str(err))
    model, tokenizer, description = load_or_exit(parser, args.model, args.device)
    documents = calibration_documents(tokenizer, args.data, args.max_tokens)
    result = calibrate(model, documents, args.counts, args.segment, tolerance=args.tolerance, max_heads=args.max_heads)
    patch(model, heads=result["heads"])
    save_patch(model, args.output)
    unpatch(model)
    payload = {"model": description, "settings": corpus.recorded_options(args), "documents": [int(d.numel()) for d in documents],
               **result, "environment": environment()}
    write_json(os.path.join(args.output, CALIBRATION_FILE), payload, indent=1)
    for name, ppl in result["runs"].items():
        print(f"{name:>5} heads: xl+memory perplexity {ppl:.3f} on the calibration documents")
    print(f"kept {result['best']}; wrote {args.output}")
    return payload
