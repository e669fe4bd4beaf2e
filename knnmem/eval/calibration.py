"""Which heads read memory, chosen by measurement on calibration documents (training-free).

A head needs what has left its local window when restricting it to its attention sinks and that
window changes its output: DuoAttention's criterion for retrieval heads, measured here directly
instead of learnt. For the last `queries` positions of each `span`-token piece of a calibration
document, every head's causal attention output over the whole span is compared with its output
over only the first `sinks` and the last `local` tokens:

    score(layer, head) = mean over queries of ||o_span - o_local|| / ||o_span||

`choose_heads` keeps the highest-scoring heads; `calibrate` measures the memory configuration with
each candidate number of heads up to a budget (`max_heads`, default 64) on the calibration
documents and keeps the fewest heads whose perplexity is within `tolerance` (1%) of the best
candidate's: every head with memory runs an exact search over the whole memory, so each head costs
time in proportion, whether it helps or not (the settings are then saved with
`knnmem.save_patch` and restored by `knnmem.load_patch`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from .. import hf
from .._checks import check_positive_int
from ..patch import patch, unpatch
from .scoring import score_document

PROBE_NAME = "knnmem_probe"


class _Probe:
    """The attention function of a probing pass: sdpa's output, plus the score sums per head."""

    def __init__(self, n_layers: int, n_heads: int, local: int, sinks: int, queries: int) -> None:
        self.local, self.sinks, self.queries = local, sinks, queries
        self.sums = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.counts = torch.zeros(n_layers, dtype=torch.float64)

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.record(module.layer_idx, query, key, value, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    @torch.no_grad()
    def record(self, layer: int, query, key, value, scaling: float) -> None:
        """query: (1, Hq, S, D); key, value: (1, Hkv, S, D), the whole span causally."""
        S = key.shape[2]
        Q = min(self.queries, S)
        group = query.shape[1] // key.shape[1]
        k = key[0].float().repeat_interleave(group, dim=0)
        v = value[0].float().repeat_interleave(group, dim=0)
        q = query[0, :, S - Q:].float()
        logits = (q @ k.transpose(-1, -2)) * scaling  # (Hq, Q, S)
        position = torch.arange(S - Q, S, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None]
        causal = j <= position
        local = causal & ((j < self.sinks) | (j > position - self.local))
        full = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1) @ v
        near = torch.softmax(logits.masked_fill(~local, -math.inf), dim=-1) @ v
        change = (full - near).norm(dim=-1) / full.norm(dim=-1).clamp(min=1e-12)  # (Hq, Q)
        self.sums[layer] += change.mean(dim=-1).double().cpu()
        self.counts[layer] += 1


@torch.no_grad()
def head_scores(model, documents: Sequence[torch.Tensor], span: int = 4096, local: int = 1024, sinks: int = 4,
                queries: int = 256, progress: bool = True) -> torch.Tensor:
    """(layers, heads) float64: how much each head's output depends on tokens beyond its sinks and
    last `local` tokens, averaged over the `span`-token pieces of `documents` (1-D token ids)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    n_heads, _, _ = hf.head_shape(model)
    probe = _Probe(len(hf.attention_modules(model)), n_heads, local, sinks, queries)
    AttentionInterface.register(PROBE_NAME, probe)
    AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_NAME)
    try:
        spans = [ids[i:i + span] for ids in documents for i in range(0, ids.numel() - span + 1, span)]
        if not spans:
            raise ValueError(f"the calibration documents hold no span of {span} tokens")
        for ids in tqdm(spans, desc="calibrate heads", unit="span", disable=not progress):
            model(ids[None].to(model.device), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return probe.sums / probe.counts.clamp(min=1)[:, None]


def choose_heads(scores: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """The `count` (layer, head) pairs of the highest scores, sorted."""
    top = scores.flatten().topk(min(count, scores.numel())).indices
    return sorted((int(i) // scores.shape[1], int(i) % scores.shape[1]) for i in top)


DEFAULT_TOLERANCE = 0.01  # a perplexity within 1% of the best is worth fewer heads
DEFAULT_MAX_HEADS = 64  # the search budget: about a quarter of SmolLM2's 270 query heads (see the README)


def calibrate(model, documents: Sequence[torch.Tensor], counts: Sequence[int], segment: int = 512,
              span: int = 4096, measure: Callable[[object], float] | None = None, progress: bool = True,
              tolerance: float = DEFAULT_TOLERANCE, max_heads: int | None = DEFAULT_MAX_HEADS,
              **patch_options) -> dict:
    """Score the heads on `documents` (`head_scores` over `span`-token pieces, local = the
    xl+memory local context of two segments), then patch with the top-N heads for each N of
    `counts` (and with every head) up to `max_heads` heads (None: no budget) and measure the
    xl+memory perplexity on the same calibration documents (or `measure(patched model)`, lower is
    better), and keep the fewest heads within `tolerance` (a fraction) of the lowest perplexity.
    Returns {"scores": (layers, heads) list, "runs": {N or "all": perplexity}, "best": N or "all",
    "heads": the best's (layer, head) pairs or None, "tolerance"}. The model is left unpatched."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in [0, 1), got {tolerance!r}")
    if max_heads is not None:
        check_positive_int("max_heads", max_heads)
    scores = head_scores(model, documents, span=span, local=2 * segment, progress=progress)
    measure = measure or (lambda m: _perplexity(m, documents, segment))
    n_heads = scores.numel()
    budget = n_heads if max_heads is None else max_heads
    runs, choices = {}, {"all": None} if n_heads <= budget else {}
    choices.update({str(n): choose_heads(scores, n) for n in counts if min(n, n_heads) <= budget})
    if not choices:
        raise ValueError(f"no candidate fits max_heads={max_heads}: give a count of at most {max_heads} heads")
    bar = tqdm(choices.items(), desc="calibrate: measure", unit="choice", disable=not progress)
    for name, heads in bar:
        patch(model, heads=heads, **patch_options)
        try:
            runs[name] = measure(model)
        finally:
            unpatch(model)
        bar.set_postfix_str(f"{name} heads: {runs[name]:.3f}")
    size = {name: n_heads if heads is None else len(heads) for name, heads in choices.items()}
    lowest = min(runs.values())
    best = min((name for name in runs if runs[name] <= lowest * (1 + tolerance)), key=lambda name: (size[name], runs[name]))
    return {"scores": scores.tolist(), "runs": runs, "best": best, "heads": choices[best], "tolerance": tolerance,
            "max_heads": max_heads}


def _perplexity(model, documents: Sequence[torch.Tensor], segment: int) -> float:
    nll, tokens = 0.0, 0
    for ids in documents:
        model.knnmem.reset()
        scored = score_document(model, ids, "xl+memory", segment)
        nll, tokens = nll + float(scored.sum()), tokens + scored.numel()
    return math.exp(nll / tokens)
