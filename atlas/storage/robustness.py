"""Threshold robustness of a path query: is its answer an artefact of one edge-weight cut-off?

`path_robustness` reruns `AtlasQueries.paths_to_logits` at several `min_abs_weight` cut-offs and compares each
answer with the loosest one's: the overlap of the top paths (as (prompt, node keys, target) tuples) and the Jaccard
similarity of the features they pass through. Stored graphs are pruned once, at ingest, so the cut-offs here act on
the stored edges (a stricter node/edge pruning threshold can only be studied by re-ingesting). Read-only; the
comparison functions are pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from atlas.storage.queries import AtlasQueries, LogitPath, QueryError


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """|A ∩ B| / |A ∪ B|; 1.0 for two empty sets (they agree)."""
    sa, sb = set(a), set(b)
    return 1.0 if not sa | sb else len(sa & sb) / len(sa | sb)


def top_overlap(reference: Sequence[tuple[str, ...]], other: Sequence[tuple[str, ...]], k: int) -> float:
    """Share of the reference's top `k` items that are also among the other's top `k` (1.0 when the reference has
    none)."""
    ref = list(reference[:k])
    return 1.0 if not ref else len(set(ref) & set(other[:k])) / len(ref)


def path_signature(path: LogitPath) -> tuple[str, ...]:
    """A path's identity across reruns: its prompt, the keys (or ids) of its nodes, its target."""
    return (path.prompt_id, *(n.key or n.node_id for n in path.nodes), path.target_text)


def path_features(paths: Iterable[LogitPath]) -> set[str]:
    return {n.key for p in paths for n in p.nodes if n.kind == "feature" and n.key}


@dataclass(frozen=True)
class ThresholdRow:
    min_abs_weight: float
    n_paths: int
    n_features: int
    top_path_overlap: float  # with the loosest cut-off's top paths
    feature_jaccard: float  # with the loosest cut-off's features


def path_robustness(
    queries: AtlasQueries,
    sources: str | Sequence[str] | None,
    targets: str | Sequence[str],
    *,
    min_weights: Sequence[float],
    top_k: int = 10,
    max_hops: int = 3,
    limit: int = 100,
    at_token: str | None = None,
    prompt_ids: Sequence[str] | None = None,
) -> list[ThresholdRow]:
    """One row per cut-off, in increasing order; the first (loosest) is the reference."""
    if len(min_weights) < 2:
        raise QueryError("give at least two cut-offs to compare")
    if top_k < 1:
        raise QueryError(f"top_k must be at least 1, got {top_k}")
    weights = sorted(set(min_weights))
    answers = [
        queries.paths_to_logits(sources, targets, max_hops=max_hops, min_abs_weight=w, limit=limit,
                                at_token=at_token, prompt_ids=prompt_ids).rows
        for w in weights
    ]  # fmt: skip
    reference = answers[0]
    ref_signatures = [path_signature(p) for p in reference]
    ref_features = path_features(reference[:top_k])
    return [
        ThresholdRow(
            w,
            len(rows),
            len(path_features(rows[:top_k])),
            top_overlap(ref_signatures, [path_signature(p) for p in rows], top_k),
            jaccard(ref_features, path_features(rows[:top_k])),
        )
        for w, rows in zip(weights, answers, strict=True)
    ]
