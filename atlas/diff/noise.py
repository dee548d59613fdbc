"""Is a difference real? The noise floor of a diff, from a reference pair that should not differ.

The reference is the diff between two dictionaries of the *same* model (different seeds, or a perturbed copy) on the
same prompts: whatever it shows is dictionary noise, not a change of the model. From its per-prompt diffs,
`noise_floor` takes the `quantile` (default 0.95) of

- the prompt dissimilarity 1 − similarity, and
- the per-element weight change |w_A − w_B| of nodes and of edges (over every element present in either graph).

A prompt of the A-vs-B diff exceeds the floor when its dissimilarity is above the reference's; a node or edge change
exceeds it when its |Δw| is above the reference's element quantile. `bootstrap_interval` gives a percentile interval
of a mean over prompts (resampling prompts), the alternative when no reference pair exists.

Pure computation; it does not read or write any store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from atlas.diff.graph_diff import Change, PromptDiff


class NoiseFloorError(ValueError):
    """A reference that cannot give a noise floor (no prompts, a quantile outside (0, 1])."""


@dataclass(frozen=True)
class NoiseFloor:
    quantile: float
    prompt_dissimilarity: float
    node_delta: float
    edge_delta: float
    n_prompts: int


def noise_floor(reference: Sequence[PromptDiff], *, quantile: float = 0.95) -> NoiseFloor:
    """The `quantile` of the reference pair's prompt dissimilarities and element weight changes."""
    if not reference:
        raise NoiseFloorError("the noise floor needs at least one reference prompt diff")
    if not 0.0 < quantile <= 1.0:
        raise NoiseFloorError(f"quantile must be in (0, 1], got {quantile}")
    node = [v for d in reference for v in d.node_deltas.values()]
    edge = [v for d in reference for v in d.edge_deltas.values()]
    return NoiseFloor(
        quantile,
        float(np.quantile([1.0 - d.similarity for d in reference], quantile)),
        float(np.quantile(node, quantile)) if node else 0.0,
        float(np.quantile(edge, quantile)) if edge else 0.0,
        len(reference),
    )


def prompts_exceeding(diffs: Sequence[PromptDiff], floor: NoiseFloor) -> list[str]:
    """Prompts whose dissimilarity is above the floor's."""
    return [d.prompt for d in diffs if 1.0 - d.similarity > floor.prompt_dissimilarity]


def changes_exceeding(diff: PromptDiff, floor: NoiseFloor) -> tuple[list[Change], list[Change]]:
    """(node changes, edge changes) of one prompt — only in A, only in B or changed — whose |Δw| exceeds the floor."""
    nodes = [c for c in (*diff.nodes_only_a, *diff.nodes_only_b, *diff.nodes_changed)
             if abs(c.weight_a - c.weight_b) > floor.node_delta]  # fmt: skip
    edges = [c for c in (*diff.edges_only_a, *diff.edges_only_b, *diff.edges_changed)
             if abs(c.weight_a - c.weight_b) > floor.edge_delta]  # fmt: skip
    return nodes, edges


def bootstrap_interval(
    values: Sequence[float], *, n_resamples: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` `(n,)` and its percentile bootstrap interval at level 1 − alpha."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise NoiseFloorError("a bootstrap needs at least one value")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(data.mean()), float(low), float(high)
