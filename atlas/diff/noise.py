"""Is a difference real? The noise floor of a diff, from a reference pair that should not differ.

The reference is the diff between two dictionaries of the *same* model (different seeds, or a perturbed copy) on the
same prompts: whatever it shows is dictionary noise, not a change of the model. From its per-prompt diffs,
`noise_floor` takes the `quantile` (default 0.95) of

- the prompt dissimilarity 1 − similarity, and
- the per-element weight change |w_A − w_B| of nodes and of edges (over every element present in either graph).

The floor is per prompt where the reference holds the same prompt (diffs are keyed by A's prompt id, which both pairs
share): that prompt's own reference dissimilarity, and the `quantile` of its own element changes. Graphs differ in
how stable they are (a prompt whose target is barely reached has a near-empty graph that any dictionary noise
rearranges), so a pooled floor would hide real changes on stable prompts and flag noise on unstable ones. Prompts
missing from the reference fall back to the pooled quantiles. A prompt of the A-vs-B diff exceeds the floor when its
dissimilarity is above its floor; a node or edge change when its |Δw| is above its prompt's element floor.
`bootstrap_interval` gives a percentile interval of a mean over prompts (resampling prompts), the alternative when no
reference pair exists.

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
class Floor:
    dissimilarity: float  # 1 − similarity
    node_delta: float  # |Δw| of a node
    edge_delta: float  # |Δw| of an edge


@dataclass(frozen=True)
class NoiseFloor:
    quantile: float
    pooled: Floor  # quantiles over every reference prompt and element
    per_prompt: dict[str, Floor]  # A's prompt id → that prompt's floor
    n_prompts: int

    @property
    def prompt_dissimilarity(self) -> float:
        return self.pooled.dissimilarity

    def for_prompt(self, prompt: str) -> Floor:
        return self.per_prompt.get(prompt, self.pooled)


def _floor(diffs: Sequence[PromptDiff], quantile: float) -> Floor:
    node = [v for d in diffs for v in d.node_deltas.values()]
    edge = [v for d in diffs for v in d.edge_deltas.values()]
    return Floor(
        float(np.quantile([1.0 - d.similarity for d in diffs], quantile)),
        float(np.quantile(node, quantile)) if node else 0.0,
        float(np.quantile(edge, quantile)) if edge else 0.0,
    )


def noise_floor(reference: Sequence[PromptDiff], *, quantile: float = 0.95) -> NoiseFloor:
    """The `quantile` of the reference pair's prompt dissimilarities and element weight changes, pooled and per
    prompt."""
    if not reference:
        raise NoiseFloorError("the noise floor needs at least one reference prompt diff")
    if not 0.0 < quantile <= 1.0:
        raise NoiseFloorError(f"quantile must be in (0, 1], got {quantile}")
    return NoiseFloor(quantile, _floor(reference, quantile), {d.prompt: _floor([d], quantile) for d in reference},
                      len(reference))  # fmt: skip


def prompts_exceeding(diffs: Sequence[PromptDiff], floor: NoiseFloor) -> list[str]:
    """Prompts whose dissimilarity is above their floor."""
    return [d.prompt for d in diffs if 1.0 - d.similarity > floor.for_prompt(d.prompt).dissimilarity]


def changes_exceeding(diff: PromptDiff, floor: NoiseFloor) -> tuple[list[Change], list[Change]]:
    """(node changes, edge changes) of one prompt — only in A, only in B or changed — whose |Δw| exceeds its
    prompt's floor."""
    own = floor.for_prompt(diff.prompt)
    nodes = [c for c in (*diff.nodes_only_a, *diff.nodes_only_b, *diff.nodes_changed)
             if abs(c.weight_a - c.weight_b) > own.node_delta]  # fmt: skip
    edges = [c for c in (*diff.edges_only_a, *diff.edges_only_b, *diff.edges_changed)
             if abs(c.weight_a - c.weight_b) > own.edge_delta]  # fmt: skip
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
