"""Structural diff of two attribution graphs of one prompt, after feature alignment, and the corpus summary.

Both graphs are put in one key space (A's): a feature node is `f{layer}/{index}@{position}` with B's features
renamed to their aligned A partner (unaligned B features stay apart as `f{layer}/b{index}@{position}`), a token
`tok@{position}:{text}`, an error node `err{layer}@{position}`, a logit `logit:{text}`.

Weights are attribution mass: an edge weighs |w| / Σ|w| of its graph, a node half the normalised mass of its incident
edges (so each graph's node weights sum to 1). An element below `min_weight` counts as absent. Per prompt:
- `node_overlap`, `edge_overlap`: weighted Jaccard Σ min(w_A, w_B) / Σ max(w_A, w_B) over the union (1 = identical);
- `adjacency_similarity`: 1 − ‖A − B‖_F / (‖A‖_F + ‖B‖_F) on the signed normalised adjacency of the aligned nodes
  (a weighted edit distance: 1 = same edges and weights, 0 = disjoint);
- `spectral_similarity`: 1 − ‖σ(A) − σ(B)‖₂ / (‖σ(A)‖₂ + ‖σ(B)‖₂) on the adjacencies' singular values (invariant to
  relabelling: it sees a change of shape even where alignment failed);
- `similarity`: the mean of node overlap, edge overlap and adjacency similarity;
- elements only in A, only in B, and changed (in both, with |w_A − w_B| >= `change_ratio`·max, or an edge's sign
  flipped);
- `divergence` per layer (Σ |w_A − w_B| over its nodes; "emb" for tokens, "logit" for targets) and its argmax.

Corpus: `corpus_summary` splits the prompts into "changed" and "unchanged" at the largest gap of their sorted
similarities when that gap is >= `min_gap` (one cluster otherwise).

Pure computation on in-memory graphs; reading them from the store is `atlas.diff.run`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

EMBED, LOGIT = "emb", "logit"


@dataclass(frozen=True)
class GNode:
    kind: str  # "feature" | "token" | "error" | "logit"
    layer: int | None
    position: int | None
    feature: int | None = None
    text: str | None = None


@dataclass(frozen=True)
class Graph:
    """One prompt's graph: nodes, and edges as (source index, target index, weight)."""

    nodes: Sequence[GNode]
    edges: Sequence[tuple[int, int, float]]


@dataclass(frozen=True)
class Change:
    key: str
    weight_a: float
    weight_b: float
    layer: str


@dataclass
class PromptDiff:
    prompt: str
    node_overlap: float
    edge_overlap: float
    adjacency_similarity: float
    spectral_similarity: float
    nodes_only_a: list[Change]
    nodes_only_b: list[Change]
    nodes_changed: list[Change]
    edges_only_a: list[Change]
    edges_only_b: list[Change]
    edges_changed: list[Change]
    divergence: dict[str, float]
    node_deltas: dict[str, float] = field(default_factory=dict)  # key → |w_A − w_B| (for the noise floor)
    edge_deltas: dict[str, float] = field(default_factory=dict)

    @property
    def similarity(self) -> float:
        return (self.node_overlap + self.edge_overlap + self.adjacency_similarity) / 3

    @property
    def max_divergence_layer(self) -> str | None:
        top = max(self.divergence, key=lambda k: self.divergence[k]) if self.divergence else None
        return top if top is not None and self.divergence[top] > 0 else None


def node_key(node: GNode, rename: Mapping[tuple[int, int], int] | None = None, *, side: str = "a") -> str:
    """A node's key in A's space; `rename` maps (layer, B feature) → A feature for side "b"."""
    if node.kind == "feature":
        assert node.layer is not None and node.feature is not None
        if side == "b":
            partner = (rename or {}).get((node.layer, node.feature))
            index = f"b{node.feature}" if partner is None else str(partner)
        else:
            index = str(node.feature)
        return f"f{node.layer}/{index}@{node.position}"
    if node.kind == "token":
        return f"tok@{node.position}:{node.text}"
    if node.kind == "error":
        return f"err{node.layer}@{node.position}"
    return f"logit:{node.text}"


def node_layer(node: GNode) -> str:
    if node.kind == "token":
        return EMBED
    if node.kind == "logit":
        return LOGIT
    return str(node.layer)


def weights(graph: Graph, keys: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Normalised (node mass, signed edge weight) by key; node masses sum to 1, |edge| weights sum to 1."""
    total = sum(abs(w) for _, _, w in graph.edges)
    nodes: dict[str, float] = {}
    edges: dict[str, float] = {}
    if total == 0:
        return nodes, edges
    for s, t, w in graph.edges:
        share = abs(w) / total
        for i in (s, t):
            nodes[keys[i]] = nodes.get(keys[i], 0.0) + share / 2
        edge = f"{keys[s]} -> {keys[t]}"
        edges[edge] = edges.get(edge, 0.0) + w / total
    return nodes, edges


def weighted_jaccard(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Σ min / Σ max of |weights| over the union of keys (1.0 when both are empty)."""
    union = set(a) | set(b)
    lo = sum(min(abs(a.get(k, 0.0)), abs(b.get(k, 0.0))) for k in union)
    hi = sum(max(abs(a.get(k, 0.0)), abs(b.get(k, 0.0))) for k in union)
    return 1.0 if hi == 0 else lo / hi


def adjacency(edges: Mapping[str, float], index: Mapping[str, int]) -> np.ndarray:
    """Edge weights by "s -> t" key → `(n, n)` matrix over the node `index`."""
    matrix = np.zeros((len(index), len(index)))
    for key, w in edges.items():
        s, t = key.split(" -> ")
        matrix[index[s], index[t]] += w
    return matrix


def _similarity(x: np.ndarray, y: np.ndarray) -> float:
    denominator = float(np.linalg.norm(x) + np.linalg.norm(y))
    return 1.0 if denominator == 0 else 1.0 - float(np.linalg.norm(x - y)) / denominator


def diff_graphs(
    prompt: str,
    a: Graph,
    b: Graph,
    rename: Mapping[tuple[int, int], int],
    *,
    min_weight: float = 1e-3,
    change_ratio: float = 0.5,
) -> PromptDiff:
    """Diff graph `a` against graph `b` of the same prompt; `rename`: (layer, B feature) → aligned A feature."""
    keys_a = [node_key(n) for n in a.nodes]
    keys_b = [node_key(n, rename, side="b") for n in b.nodes]
    layer_of = {k: node_layer(n) for k, n in zip(keys_a, a.nodes, strict=True)}
    layer_of.update({k: node_layer(n) for k, n in zip(keys_b, b.nodes, strict=True)})
    nodes_a, edges_a = weights(a, keys_a)
    nodes_b, edges_b = weights(b, keys_b)
    node_union = sorted(set(nodes_a) | set(nodes_b))
    index = {k: i for i, k in enumerate(node_union)}
    adj_a, adj_b = adjacency(edges_a, index), adjacency(edges_b, index)
    sv_a = np.linalg.svd(adj_a, compute_uv=False) if len(index) else np.zeros(0)
    sv_b = np.linalg.svd(adj_b, compute_uv=False) if len(index) else np.zeros(0)

    def split(
        wa: Mapping[str, float], wb: Mapping[str, float], layer: Mapping[str, str] | None
    ) -> tuple[list[Change], list[Change], list[Change], dict[str, float]]:
        only_a, only_b, changed, deltas = [], [], [], {}
        for key in sorted(set(wa) | set(wb)):
            x, y = wa.get(key, 0.0), wb.get(key, 0.0)
            in_a, in_b = abs(x) >= min_weight, abs(y) >= min_weight
            if not (in_a or in_b):
                continue
            where = layer[key] if layer is not None else layer_of[key.split(" -> ")[1]]
            change = Change(key, x, y, where)
            deltas[key] = abs(x - y)
            if in_a and not in_b:
                only_a.append(change)
            elif in_b and not in_a:
                only_b.append(change)
            elif abs(x - y) >= change_ratio * max(abs(x), abs(y)) or (x > 0) != (y > 0):
                changed.append(change)
        return only_a, only_b, changed, deltas

    n_only_a, n_only_b, n_changed, n_deltas = split(nodes_a, nodes_b, layer_of)
    e_only_a, e_only_b, e_changed, e_deltas = split(edges_a, edges_b, None)
    divergence: dict[str, float] = {}
    for key in node_union:
        divergence[layer_of[key]] = divergence.get(layer_of[key], 0.0) + abs(nodes_a.get(key, 0.0) -
                                                                             nodes_b.get(key, 0.0))  # fmt: skip
    return PromptDiff(
        prompt,
        weighted_jaccard(nodes_a, nodes_b),
        weighted_jaccard(edges_a, edges_b),
        _similarity(adj_a, adj_b),
        _similarity(sv_a, sv_b),
        n_only_a,
        n_only_b,
        n_changed,
        e_only_a,
        e_only_b,
        e_changed,
        divergence,
        n_deltas,
        e_deltas,
    )


@dataclass(frozen=True)
class CorpusSummary:
    similarities: dict[str, float]  # prompt → similarity
    mean_similarity: float
    changed: list[str]  # the lower cluster (empty when there is a single cluster)
    unchanged: list[str]
    gap: float  # the largest gap between sorted similarities
    divergence: dict[str, float]  # layer → summed divergence over prompts
    max_divergence_layer: str | None


def corpus_summary(diffs: Sequence[PromptDiff], *, min_gap: float = 0.1) -> CorpusSummary:
    """Similarity per prompt, the two clusters split at the largest gap (if >= `min_gap`), and divergence by layer."""
    sims = {d.prompt: d.similarity for d in diffs}
    ordered = sorted(sims.items(), key=lambda kv: kv[1])
    gaps = [ordered[i + 1][1] - ordered[i][1] for i in range(len(ordered) - 1)]
    changed: list[str] = []
    gap = max(gaps) if gaps else 0.0
    if gaps and gap >= min_gap:
        cut = gaps.index(gap) + 1
        changed = [p for p, _ in ordered[:cut]]
    divergence: dict[str, float] = {}
    for d in diffs:
        for layer, value in d.divergence.items():
            divergence[layer] = divergence.get(layer, 0.0) + value
    return CorpusSummary(
        sims,
        float(np.mean(list(sims.values()))) if sims else float("nan"),
        changed,
        [p for p in sims if p not in changed],
        gap,
        divergence,
        max(divergence, key=lambda k: divergence[k]) if divergence and max(divergence.values()) > 0 else None,
    )
