"""Prompts grouped by shared circuitry: influence-weighted feature vectors, MinHash/LSH candidate neighbours, DBSCAN
on the sparse neighbour graph, and each cluster's characteristic features and motifs.

Pure functions over plain data (no store); `atlas.analysis.corpus_motifs.cluster_store` reads and writes Neo4j.

Similarity. A prompt is the vector over feature identities of `influence × idf`: a feature's influence in the prompt
is the share of the prompt's output mass it carries (`atlas.attribution.pruning.influence` over the stored graph's
normalised edges, seeded with the logit probabilities; summed over the positions it is active at), and
`idf = 1 + log((1 + N) / (1 + df))` down-weights features active in nearly every prompt (which would otherwise make
every pair look alike). Rows are L2-normalised, so two prompts' similarity is the cosine of their vectors: 1 when the
same features carry the same shares, 0 when no feature is shared.

Scale. All pairs are never compared: each prompt's top `signature_features` features (by weight) are MinHashed
(`n_hashes` universal hashes, in `bands` bands of `n_hashes / bands` rows); two prompts become a candidate pair when
some band agrees, which happens with probability `1 − (1 − J^r)^b` for Jaccard overlap J of those sets (r = 2,
b = 32: 0.96 at J = 0.3, 0.27 at J = 0.1). Cosines are computed for candidate pairs only and each prompt keeps its
`n_neighbours` most similar ones. Cost: O(N · n_hashes) hashing plus the candidate pairs, which for a corpus of
distinct tasks grows with the sum of squared group sizes, not N². A prompt whose top features all sit in huge buckets
(`max_bucket`) is only paired within a random sample of its bucket, so the cost stays bounded.

Clustering. scikit-learn's DBSCAN on the sparse precomputed distance graph (1 − cosine): it takes exactly such a
sparse neighbour graph (only the stored neighbours are ever considered), needs no number of clusters, and leaves
prompts that share their circuitry with too few others unclustered (label -1) instead of forcing them into a group.
A cluster is the prompts within `eps` (cosine distance) of one another through chains of core prompts having at
least `min_samples` such neighbours.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from atlas.analysis.motifs import PromptGraph
from atlas.attribution.pruning import SparseEdges, influence, normalise

_PRIME = (1 << 31) - 1  # a·x + b stays below 2^62 for ids < 2^31: exact in int64


class ClusterError(ValueError):
    """Parameters or inputs the clustering cannot use."""


def feature_influence(graph: PromptGraph) -> dict[str, float]:
    """Each feature key's influence on the prompt's logits (summed over its positions); see the module docstring."""
    n = len(graph.kinds)
    if not graph.edges:
        return {}
    source, target, weight = (torch.tensor(c, dtype=dtype) for c, dtype in
                              zip(zip(*graph.edges, strict=True), (torch.long, torch.long, torch.float64),
                                  strict=True))  # fmt: skip
    seed = torch.tensor(
        [p if k == "logit" else 0.0 for k, p in zip(graph.kinds, graph.probability, strict=True)], dtype=torch.float64
    )
    scores = influence(normalise(SparseEdges(target, source, weight, n)), seed)
    out: dict[str, float] = defaultdict(float)
    for i, (kind, key) in enumerate(zip(graph.kinds, graph.keys, strict=True)):
        if kind == "feature" and key is not None and scores[i] > 0:
            out[key] += float(scores[i])
    return dict(out)


@dataclass(frozen=True)
class PromptVectors:
    prompt_ids: list[str]
    features: list[str]
    matrix: object  # scipy.sparse.csr_matrix (n_prompts, n_features), rows L2-normalised (empty prompts: zero)


def prompt_vectors(weights: Mapping[str, Mapping[str, float]]) -> PromptVectors:
    """`{prompt: {feature: influence}}` → influence × idf vectors, L2-normalised rows (prompts sorted by id)."""
    from scipy import sparse

    prompt_ids = sorted(weights)
    features = sorted({f for w in weights.values() for f in w})
    column = {f: j for j, f in enumerate(features)}
    rows, cols, values = [], [], []
    for i, pid in enumerate(prompt_ids):
        for f, w in weights[pid].items():
            if w > 0:
                rows.append(i)
                cols.append(column[f])
                values.append(w)
    matrix = sparse.csr_matrix((values, (rows, cols)), shape=(len(prompt_ids), len(features)), dtype=np.float64)
    df = np.asarray((matrix > 0).sum(axis=0)).ravel()
    idf = 1.0 + np.log((1.0 + len(prompt_ids)) / (1.0 + df))
    matrix = matrix @ sparse.diags(idf)
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    matrix = sparse.diags(np.where(norms > 0, 1.0 / np.maximum(norms, 1e-300), 0.0)) @ matrix
    return PromptVectors(prompt_ids, features, sparse.csr_matrix(matrix))


def minhash_candidates(
    sets: Sequence[Sequence[int]], *, n_hashes: int = 64, bands: int = 32, seed: int = 0, max_bucket: int = 500
) -> set[tuple[int, int]]:
    """Candidate pairs (i < j) of sets sharing a MinHash band; see the module docstring for the probabilities."""
    if n_hashes % bands:
        raise ClusterError(f"n_hashes ({n_hashes}) must be a multiple of bands ({bands})")
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, n_hashes, dtype=np.int64)[:, None]
    b = rng.integers(0, _PRIME, n_hashes, dtype=np.int64)[:, None]
    rows = n_hashes // bands
    buckets: dict[tuple[int, tuple[int, ...]], list[int]] = defaultdict(list)
    for i, items in enumerate(sets):
        if not items:
            continue
        x = np.asarray(sorted(set(items)), dtype=np.int64)[None, :]
        if x.max() >= _PRIME or x.min() < 0:
            raise ClusterError(f"set items must be in [0, 2^31 - 1), got {x.min()}..{x.max()}")
        signature = ((a * x + b) % _PRIME).min(axis=1).tolist()
        for band in range(bands):
            buckets[(band, tuple(signature[band * rows : (band + 1) * rows]))].append(i)
    pairs: set[tuple[int, int]] = set()
    for members in buckets.values():
        if len(members) > max_bucket:
            members = sorted(rng.choice(members, max_bucket, replace=False).tolist())
        for p, i in enumerate(members):
            for j in members[p + 1 :]:
                pairs.add((i, j))
    return pairs


def neighbour_graph(vectors: PromptVectors, pairs: set[tuple[int, int]], n_neighbours: int) -> object:
    """Sparse symmetric cosine-distance matrix over `pairs`, each prompt keeping its `n_neighbours` nearest.

    Distances are stored as `max(1 − cos, 1e-12)`: DBSCAN treats only stored entries as neighbours, and an exact zero
    would be dropped by scipy as structural."""
    from scipy import sparse

    if n_neighbours < 1:
        raise ClusterError(f"n_neighbours must be ≥ 1, got {n_neighbours}")
    n = len(vectors.prompt_ids)
    matrix = vectors.matrix
    best: dict[int, list[tuple[float, int]]] = defaultdict(list)
    ordered = sorted(pairs)
    if ordered:
        left = np.fromiter((i for i, _ in ordered), dtype=np.int64)
        right = np.fromiter((j for _, j in ordered), dtype=np.int64)
        cosines = np.asarray(matrix[left].multiply(matrix[right]).sum(axis=1)).ravel()  # type: ignore[index]
        for i, j, c in zip(left.tolist(), right.tolist(), cosines.tolist(), strict=True):
            if c > 0:
                best[i].append((c, j))
                best[j].append((c, i))
    keep: dict[tuple[int, int], float] = {}
    for i, candidates in best.items():
        for c, j in sorted(candidates, key=lambda t: (-t[0], t[1]))[:n_neighbours]:
            keep[(min(i, j), max(i, j))] = max(1.0 - c, 1e-12)
    rows = [i for i, _ in keep] + [j for _, j in keep]
    cols = [j for _, j in keep] + [i for i, _ in keep]
    values = list(keep.values()) * 2
    return sparse.csr_matrix((values, (rows, cols)), shape=(n, n), dtype=np.float64)


def cluster_labels(distances: object, *, eps: float = 0.5, min_samples: int = 2) -> np.ndarray:
    """DBSCAN labels (−1: unclustered), renumbered so cluster 0 is the largest (ties: earliest member)."""
    from sklearn.cluster import DBSCAN

    if not 0.0 < eps < 1.0:
        raise ClusterError(f"eps (a cosine distance) must be in (0, 1), got {eps}")
    if min_samples < 2:
        raise ClusterError(f"min_samples must be ≥ 2 (a cluster of one shares nothing), got {min_samples}")
    raw = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(distances)
    groups = sorted({int(x) for x in raw if x >= 0}, key=lambda c: (-int((raw == c).sum()), int(np.argmax(raw == c))))
    renumber = {old: new for new, old in enumerate(groups)}
    return np.array([renumber.get(int(x), -1) for x in raw], dtype=np.int64)


@dataclass(frozen=True)
class ClusterSummary:
    index: int
    prompt_ids: list[str]
    features: list[tuple[str, float]]  # (feature key, mean weight inside − mean weight outside), largest first
    motifs: list[tuple[str, float]]  # (motif key, share of members using it × share of its uses inside), largest first
    cohesion: float  # mean cosine between members and their cluster's centroid direction


def summarise(
    vectors: PromptVectors, labels: np.ndarray, prompt_motifs: Mapping[str, Sequence[str]], *, top: int = 8
) -> list[ClusterSummary]:
    """Characteristic features and motifs of every cluster (label ≥ 0)."""
    matrix = vectors.matrix
    dense_mean_all = np.asarray(matrix.mean(axis=0)).ravel()  # type: ignore[attr-defined]
    uses: dict[str, int] = defaultdict(int)
    for keys in prompt_motifs.values():
        for key in set(keys):
            uses[key] += 1
    out = []
    for c in range(int(labels.max(initial=-1)) + 1):
        members = np.flatnonzero(labels == c)
        others = np.flatnonzero(labels != c)
        inside = np.asarray(matrix[members].mean(axis=0)).ravel()  # type: ignore[index]
        outside = (
            np.asarray(matrix[others].mean(axis=0)).ravel() if len(others) else np.zeros_like(dense_mean_all)  # type: ignore[index]
        )
        score = inside - outside
        order = np.argsort(-score, kind="stable")[:top]
        features = [(vectors.features[j], float(score[j])) for j in order if score[j] > 0]
        ids = [vectors.prompt_ids[i] for i in members]
        counts: dict[str, int] = defaultdict(int)
        for pid in ids:
            for key in set(prompt_motifs.get(pid, ())):
                counts[key] += 1
        motif_scores = sorted(
            ((key, (n / len(ids)) * (n / uses[key])) for key, n in counts.items()), key=lambda t: (-t[1], t[0])
        )[:top]
        centroid = inside / max(float(np.linalg.norm(inside)), 1e-300)
        cohesion = float(np.mean(matrix[members] @ centroid))  # type: ignore[index]
        out.append(ClusterSummary(c, ids, features, motif_scores, cohesion))
    return out
