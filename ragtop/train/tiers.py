"""Frequency tiers: which tokens get wide embedding rows and which narrow ones."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import RagtopError

DEFAULT_MASS_CUTS = (0.80, 0.95)  # tier 0 covers 80% of training tokens, tier 1 the next 15%
DEFAULT_WIDTH_FACTORS = (1.0, 0.25, 0.0625)


@dataclass(frozen=True)
class TierPlan:
    token_ids: tuple[tuple[int, ...], ...]  # tier i's tokens, most frequent first
    widths: tuple[int, ...]
    mass: tuple[float, ...]  # share of training tokens each tier covers

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(t) for t in self.token_ids)


def token_counts(id_streams: Iterable[Sequence[int]], vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids in id_streams:
        counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    return counts


def plan_tiers(
    counts: np.ndarray,
    d_model: int,
    mass_cuts: Sequence[float] = DEFAULT_MASS_CUTS,
    width_factors: Sequence[float] = DEFAULT_WIDTH_FACTORS,
) -> TierPlan:
    """Sort tokens by frequency (ties: lower id first) and cut by cumulative mass.

    Tier i holds the tokens whose cumulative share of the training tokens lies in
    (mass_cuts[i-1], mass_cuts[i]]; the last tier holds the rest. Widths are
    max(1, round(d_model * width_factors[i])).
    """
    if len(width_factors) != len(mass_cuts) + 1:
        raise RagtopError(
            f"{len(width_factors)} tier widths need {len(width_factors) - 1} mass cuts, got {len(mass_cuts)}"
        )
    if list(mass_cuts) != sorted(mass_cuts) or not all(0 < c < 1 for c in mass_cuts):
        raise RagtopError(f"mass cuts must increase strictly inside (0, 1), got {list(mass_cuts)}")
    vocab = len(counts)
    order = np.lexsort((np.arange(vocab), -counts))  # by count desc, then id asc
    total = max(int(counts.sum()), 1)
    cum = np.cumsum(counts[order]) / total
    bounds = [int(np.searchsorted(cum, c, side="left")) + 1 for c in mass_cuts] + [vocab]
    bounds = np.maximum.accumulate(np.minimum(bounds, vocab)).tolist()
    tiers, start = [], 0
    for b in bounds:
        b = max(b, start + 1)  # every tier holds at least one token
        tiers.append(tuple(int(t) for t in order[start:b]))
        start = b
    if start != vocab or any(len(t) == 0 for t in tiers):
        raise RagtopError(f"vocabulary of {vocab} tokens is too small for {len(width_factors)} tiers")
    widths = tuple(max(1, round(d_model * f)) for f in width_factors)
    mass = tuple(float(counts[list(t)].sum()) / total for t in tiers)
    return TierPlan(tuple(tiers), widths, mass)
