"""Statistics of circuit validation: effect fractions, null-control p-values and z-scores, Spearman, aggregation.

Pure functions of numbers and tensors (no model, no storage), tested on toy data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def fraction_of(change: float, reference: float) -> float:
    """`change / reference`, NaN when the reference is zero (the fraction is undefined, never infinite)."""
    return change / reference if reference != 0 else math.nan


def necessity(clean: float, ablated: float) -> float:
    """Drop of the target as a fraction of its clean value: `(clean − ablated) / clean`."""
    return fraction_of(clean - ablated, clean)


def recovered(kept: float, empty: float, clean: float) -> float:
    """Fraction of the target recovered by keeping only a circuit: `(kept − empty) / (clean − empty)`, where
    `empty` is the target with every feature ablated (the same error treatment)."""
    return fraction_of(kept - empty, clean - empty)


def empirical_p_value(observed: float, null: Sequence[float], tolerance: float = 0.0) -> float:
    """One-sided empirical p-value `(1 + #{null ≥ observed − tolerance}) / (1 + n)`: how often a null set does at
    least as well. `tolerance` counts near-ties (rounding noise) as ties. NaN nulls are dropped."""
    values = [v for v in null if not math.isnan(v)]
    if math.isnan(observed) or not values:
        return math.nan
    at_least = sum(1 for v in values if v >= observed - tolerance)
    return (1 + at_least) / (1 + len(values))


def z_score(observed: float, null: Sequence[float]) -> float:
    """`(observed − mean(null)) / std(null)` (sample std); ±inf when the nulls agree exactly and differ from it,
    0 when they equal it, NaN with fewer than two finite nulls."""
    values = torch.tensor([v for v in null if not math.isnan(v)], dtype=torch.float64)
    if math.isnan(observed) or values.numel() < 2:
        return math.nan
    diff = observed - float(values.mean())
    spread = float(values.std(unbiased=True))
    if spread == 0.0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / spread


def ranks(values: torch.Tensor) -> torch.Tensor:
    """`(n,)` → `(n,)` ranks from 1, ties given their average rank."""
    n = values.numel()
    order = values.argsort(stable=True)
    sorted_values = values[order]
    result = torch.empty(n, dtype=torch.float64)
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and sorted_values[stop] == sorted_values[start]:
            stop += 1
        result[order[start:stop]] = (start + stop + 1) / 2  # mean of ranks start+1 .. stop
        start = stop
    return result


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of `x (n,)` and `y (n,)` (Pearson on average ranks); NaN when n < 2 or a side is
    constant."""
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"spearman needs two vectors of equal length, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() < 2:
        return math.nan
    rx, ry = ranks(x.double()), ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denominator if denominator > 0 else math.nan


@dataclass(frozen=True)
class Summary:
    n: int  # finite values summarised
    mean: float
    std: float  # sample standard deviation (NaN for n < 2)
    minimum: float
    maximum: float


def summarise(values: Sequence[float]) -> Summary:
    """Mean, spread and range of the finite values (NaN values, undefined fractions, are left out)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    t = torch.tensor(finite, dtype=torch.float64)
    std = float(t.std(unbiased=True)) if len(finite) > 1 else math.nan
    return Summary(len(finite), float(t.mean()), std, float(t.min()), float(t.max()))
