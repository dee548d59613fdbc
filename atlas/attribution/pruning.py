"""Influence, pruning and graph scores on sparse edge lists (pure functions, no model).

An attribution graph's edges are kept as a `SparseEdges` list, `adjacency[target, source] = weight`, never as a
dense `n_nodes²` matrix: every function here costs memory in proportion to the number of stored edges. This is
what lets long prompts be pruned where a dense `N × N` matrix and a sort of `N²` scores run out of memory.

Definitions (the same as circuit-tracer's `graph.py`, so graphs compare):
- `normalise`: each target's incoming |weights| sum to 1.
- `influence(A, w) = w·A + w·A² + …` for the target weights `w` (logit probabilities on logit nodes); finite
  because an attribution graph is a DAG.
- `prune`: keep nodes holding `node_threshold` of the cumulative influence (tokens and logits always), then edges
  holding `edge_threshold` of the influence-weighted edge mass, then drop features and errors left without an
  outgoing edge and features without an incoming one, until nothing changes.
- `graph_scores`: replacement (share of source influence that starts at tokens rather than errors) and
  completeness (share of each node's normalised input not coming from errors, weighted by influence).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from atlas.attribution.nodes import NodeIndex, NodeKind


class SparseEdges(NamedTuple):
    """`adjacency[target[e], source[e]] = weight[e]` for a graph of `n_nodes` nodes."""

    target: torch.Tensor  # (n_edges,) long
    source: torch.Tensor  # (n_edges,) long
    weight: torch.Tensor  # (n_edges,) float
    n_nodes: int

    @classmethod
    def from_dense(cls, adjacency: torch.Tensor) -> SparseEdges:
        """From a dense `(n_nodes, n_nodes)` matrix (for tests and small graphs)."""
        target, source = adjacency.nonzero(as_tuple=True)
        return cls(target, source, adjacency[target, source], adjacency.shape[0])

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.n_nodes, self.n_nodes, dtype=self.weight.dtype)
        dense.index_put_((self.target, self.source), self.weight, accumulate=True)
        return dense

    def select(self, mask: torch.Tensor) -> SparseEdges:
        return SparseEdges(self.target[mask], self.source[mask], self.weight[mask], self.n_nodes)


class PruneResult(NamedTuple):
    node_mask: torch.Tensor  # (n_nodes,) bool
    edge_mask: torch.Tensor  # (n_edges,) bool, aligned with the input edges
    cumulative_scores: torch.Tensor  # (n_nodes,) node's position in the normalised cumulative influence


class GraphScores(NamedTuple):
    replacement: float
    completeness: float


def normalise(edges: SparseEdges) -> SparseEdges:
    """|weights| divided by each target's total incoming |weight| (clamped at 1e-10)."""
    magnitude = edges.weight.abs()
    row_sums = torch.zeros(edges.n_nodes, dtype=magnitude.dtype).index_add_(0, edges.target, magnitude)
    return SparseEdges(edges.target, edges.source, magnitude / row_sums.clamp(min=1e-10)[edges.target], edges.n_nodes)


def influence(normalised: SparseEdges, seed: torch.Tensor, max_iterations: int = 1000) -> torch.Tensor:
    """`seed·A + seed·A² + …`: `(n_nodes,)` influence of every node on the seeded targets.

    Raises RuntimeError if the series does not vanish within `max_iterations` (the graph has a cycle).
    """
    total = torch.zeros_like(seed)
    current = seed
    for _ in range(max_iterations):
        current = torch.zeros_like(seed).index_add_(
            0, normalised.source, current[normalised.target] * normalised.weight
        )
        if not current.any():
            return total
        total = total + current
    raise RuntimeError(f"influence did not converge in {max_iterations} iterations; is the graph acyclic?")


def find_threshold(scores: torch.Tensor, fraction: float) -> float:
    """The smallest score among the top scores that together hold `fraction` of the total."""
    if scores.numel() == 0:
        return float("inf")
    ordered = scores.flatten().sort(descending=True).values
    total = ordered.sum().clamp(min=1e-30)
    cumulative = ordered.cumsum(0) / total
    position = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype)).item())
    return float(ordered[min(position, ordered.numel() - 1)].item())


def logit_seed(index: NodeIndex, probabilities: torch.Tensor) -> torch.Tensor:
    """`(n_nodes,)` weights: the targets' probabilities on logit nodes, zero elsewhere."""
    seed = torch.zeros(index.n_nodes, dtype=probabilities.dtype)
    seed[index.slice(NodeKind.LOGIT)] = probabilities
    return seed


def cumulative_influence_scores(node_influence: torch.Tensor) -> torch.Tensor:
    """Each node's place in the normalised cumulative influence (0 → most influential first)."""
    ordered, order = node_influence.sort(descending=True)
    scores = torch.zeros_like(node_influence)
    scores[order] = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    return scores


def prune(
    edges: SparseEdges,
    index: NodeIndex,
    probabilities: torch.Tensor,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> PruneResult:
    """Keep the nodes and edges that carry most of the influence on the targets (see the module docstring)."""
    seed = logit_seed(index, probabilities)
    node_influence = influence(normalise(edges), seed)
    always = torch.zeros(index.n_nodes, dtype=torch.bool)
    always[index.slice(NodeKind.TOKEN)] = True
    always[index.slice(NodeKind.LOGIT)] = True
    node_mask = (node_influence >= find_threshold(node_influence, node_threshold)) | always

    edge_mask = node_mask[edges.target] & node_mask[edges.source]
    kept = normalise(edges.select(edge_mask))
    target_weight = influence(kept, seed) + seed
    edge_scores = kept.weight * target_weight[kept.target]
    edge_keep = edge_scores >= find_threshold(edge_scores, edge_threshold)
    edge_mask[edge_mask.clone()] = edge_keep

    n_features = index.n_features
    prunable = torch.zeros(index.n_nodes, dtype=torch.bool)
    prunable[index.slice(NodeKind.FEATURE)] = True
    prunable[index.slice(NodeKind.ERROR)] = True
    while True:
        edge_mask &= node_mask[edges.target] & node_mask[edges.source]
        has_out = torch.zeros(index.n_nodes, dtype=torch.bool)
        has_out[edges.source[edge_mask]] = True
        has_in = torch.zeros(index.n_nodes, dtype=torch.bool)
        has_in[edges.target[edge_mask]] = True
        new_mask = node_mask & ~(prunable & ~has_out)
        new_mask[:n_features] &= has_in[:n_features]
        if torch.equal(new_mask, node_mask):
            break
        node_mask = new_mask
    return PruneResult(node_mask, edge_mask, cumulative_influence_scores(node_influence))


def graph_scores(edges: SparseEdges, index: NodeIndex, probabilities: torch.Tensor) -> GraphScores:
    """Replacement and completeness scores of a (pruned or unpruned) graph."""
    seed = logit_seed(index, probabilities)
    normalised = normalise(edges)
    node_influence = influence(normalised, seed)
    errors, tokens = index.slice(NodeKind.ERROR), index.slice(NodeKind.TOKEN)
    token_influence = node_influence[tokens].sum()
    error_influence = node_influence[errors].sum()
    replacement = token_influence / (token_influence + error_influence).clamp(min=1e-30)
    from_error = (normalised.source >= errors.start) & (normalised.source < errors.stop)
    error_share = torch.zeros(index.n_nodes, dtype=normalised.weight.dtype).index_add_(
        0, normalised.target[from_error], normalised.weight[from_error]
    )
    output_influence = node_influence + seed
    completeness = ((1 - error_share) * output_influence).sum() / output_influence.sum().clamp(min=1e-30)
    return GraphScores(float(replacement), float(completeness))
