"""Synthetic data for tests and benchmarks: clustered keys, like the keys of a real model."""
from __future__ import annotations

import torch


def clustered_keys(n: int, dim: int, clusters: int = 1024, spread: float = 0.8,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, dim) float32 vectors drawn around `clusters` random unit centres with relative noise
    `spread` (keys of real attention heads are far from uniform on the sphere)."""
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=generator), dim=-1)
    labels = torch.randint(clusters, (n,), generator=generator)
    noise = torch.randn(n, dim, generator=generator) * spread / dim**0.5
    return centres[labels] + noise


def repeated_motifs(n_tokens: int, vocab_size: int, distances: list[int], motif: tuple[int, int] = (16, 48),
                    repeats: int = 3, recurring: float = 0.25,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A document with a known answer in which copying can be learnt locally: random motifs (of
    lengths drawn uniformly from `motif`), each written `repeats` times in a row, so that most
    tokens repeat the token one motif back; and a fraction `recurring` of the motifs are not new
    but recur from exactly one of `distances` back (taken in turn, skipping those with no earlier
    motif in reach; the copy is of that motif's last repetition, placed by a few random filler
    tokens before it), then repeat.
    Copying at a random distance needs an induction circuit (a previous-token head, then a
    content match); dense local repeats let it form within a few hundred steps, where sparse
    recurrences alone leave a small model at chance for thousands (benchmarks/copy_emergence.py).

    Returns (tokens (n_tokens,) int64 in [0, vocab_size), distance (n_tokens,) int64): how far
    back the nearest earlier occurrence of the token lies, where its previous token was copied
    from there too (every token of a repetition or recurrence but its first); 0 where nothing
    earlier predicts the token (new motifs, filler, first tokens). Local repeats lie at distances
    in `motif`, recurrences exactly at `distances`; a motif recurs at most once from each place,
    so its copy has one nearest source. ValueError on arguments that cannot make such a document.
    """
    low, high = motif
    if n_tokens <= 0 or vocab_size < 2 or not 2 <= low <= high or repeats < 1 or not 0 <= recurring < 1:
        raise ValueError(f"need n_tokens > 0, vocab_size >= 2, motif (low, high) with 2 <= low <= high, repeats >= 1, "
                         f"0 <= recurring < 1; got {n_tokens}, {vocab_size}, {motif}, {repeats}, {recurring}")
    if recurring and (not distances or min(distances) <= high):
        raise ValueError(f"distances must all exceed the longest motif ({high}), got {distances}")
    uniform = lambda n: torch.randint(vocab_size, (n,), generator=generator)  # noqa: E731
    pieces, offsets = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    sources: list[tuple[int, torch.Tensor]] = []  # (start, motif) of each motif's latest last repetition, by start
    written, recurrences = 0, 0
    longest_filler = high * repeats  # one motif's repetitions: a source lies at most that far past written - d

    def write(tokens: torch.Tensor, distance: torch.Tensor) -> None:
        nonlocal written
        pieces.append(tokens)
        offsets.append(distance)
        written += len(tokens)

    def copied_from(d: int, length: int) -> torch.Tensor:
        return torch.tensor([0] + [d] * (length - 1))

    while written < n_tokens:
        source = None
        if sources and float(torch.rand((), generator=generator)) < recurring:
            for step in range(len(distances)):  # the next distance (cyclically) with a source in reach
                d = distances[(recurrences + step) % len(distances)]
                near = [i for i, (start, _) in enumerate(sources) if 0 <= start - (written - d) <= longest_filler]
                if near:
                    source = sources.pop(near[0])
                    recurrences += step + 1
                    break
            if source is not None:
                filler = source[0] + d - written
                write(uniform(filler), torch.zeros(filler, dtype=torch.long))
                text = source[1]
                write(text, copied_from(d, len(text)))
        if source is None:
            text = uniform(int(torch.randint(low, high + 1, (), generator=generator)))
            write(text, torch.zeros(len(text), dtype=torch.long))
        for _ in range(repeats - 1):
            write(text, copied_from(len(text), len(text)))
        sources.append((written - len(text), text))
    return torch.cat(pieces)[:n_tokens], torch.cat(offsets)[:n_tokens]
