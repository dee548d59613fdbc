"""Global vs empirical: how well input-independent weights predict the attributions measured across the corpus.

For the feature → feature pairs that are both stored as global weights (`atlas.storage.global_weights`) and
aggregated over the stored prompts (`:AGG_EDGE`, `atlas.storage.aggregate`), Spearman's rank correlation between
the mean attribution (`mean_weight`: summed edge weight / prompts that have the pair) and
- the raw virtual weight V, and
- TWERA (only pairs that have one: the target fired in the co-activation corpus).
The empirical side counts every stored edge of the pair, at any pair of positions (attention paths included); the
global side is the same-position residual path only, so a perfect correlation is not expected.
This module computes on rows handed to it; it queries no store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


def ranks(values: torch.Tensor) -> torch.Tensor:
    """`(n,)` → `(n,)` float64 ranks 1…n, ties given their average rank."""
    values = values.double()
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    out = torch.empty_like(values)
    n, start = values.numel(), 0
    while start < n:
        end = start
        while end + 1 < n and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        out[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN with fewer than 2 points or a constant side."""
    a, b = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"spearman needs two equal-length 1-D sequences, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() < 2:
        return math.nan
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return math.nan if denominator == 0 else float((ra * rb).sum()) / denominator


@dataclass(frozen=True)
class Comparison:
    n_global_pairs: int  # stored feature pairs
    n_empirical_pairs: int  # aggregated feature → feature pairs
    n_matched: int  # in both
    spearman_v: float
    n_with_twera: int
    spearman_twera: float


Pair = tuple[int, int, int, int]  # (source layer, source, target layer, target)


def parse_feature_key(key: str) -> tuple[int, int]:
    """`"{transcoder}/{layer}/{index}"` → (layer, index)."""
    _, layer, index = key.rsplit("/", 2)
    return int(layer), int(index)


def compare(
    global_rows: Iterable[tuple[Pair, float, float | None]], empirical_rows: Iterable[tuple[Pair, float]]
) -> Comparison:
    """Spearman of mean attribution against V and against TWERA over the pairs present on both sides.

    `global_rows`: ((pair), v, twera or None); `empirical_rows`: ((pair), mean attribution).
    """
    global_rows_list = list(global_rows)
    stored = {pair: v for pair, v, _ in global_rows_list}
    twera = {pair: t for pair, _, t in global_rows_list if t is not None and not math.isnan(t)}
    empirical = dict(empirical_rows)
    matched = sorted(set(stored) & set(empirical))
    with_twera = [p for p in matched if p in twera]
    return Comparison(
        n_global_pairs=len(stored),
        n_empirical_pairs=len(empirical),
        n_matched=len(matched),
        spearman_v=spearman([empirical[p] for p in matched], [stored[p] for p in matched]),
        n_with_twera=len(with_twera),
        spearman_twera=spearman([empirical[p] for p in with_twera], [twera[p] for p in with_twera]),
    )
