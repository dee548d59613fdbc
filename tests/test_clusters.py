"""Prompt clusters on synthetic corpora: influence by hand, LSH candidates against exact all-pairs cosines, planted
groups recovered by DBSCAN, and their characteristic features. (The real-store test is in tests/test_motifs.py.)"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from atlas.analysis.clusters import (
    ClusterError,
    cluster_labels,
    feature_influence,
    minhash_candidates,
    neighbour_graph,
    prompt_vectors,
    summarise,
)
from tests.test_motifs import toy

GROUPS, PER_GROUP, CORE, NOISE, POOL = 3, 40, 10, 5, 300


def planted_corpus(seed: int = 0) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Three tasks: each prompt uses its task's 10 core features (random strengths) plus 5 random pool features."""
    rng = np.random.default_rng(seed)
    weights, group = {}, {}
    for g, i in itertools.product(range(GROUPS), range(PER_GROUP)):
        pid = f"g{g}-{i:02d}"
        w = {f"tc/{g}/{c}": float(rng.uniform(0.5, 1.5)) for c in range(CORE)}
        for j in rng.choice(POOL, NOISE, replace=False):
            w[f"tc/9/{j}"] = float(rng.uniform(0.1, 1.0))
        weights[pid], group[pid] = w, g
    return weights, group


def signatures(vectors: object, top: int = 32) -> list[list[int]]:
    matrix = vectors.matrix  # type: ignore[attr-defined]
    out = []
    for i in range(matrix.shape[0]):
        row = matrix.getrow(i)
        out.append(row.indices[(-row.data).argsort(kind="stable")[:top]].tolist())
    return out


def test_feature_influence_is_the_output_share_by_hand() -> None:
    # T → a → b → L (p 0.8); b carries 3 of L's |input| 4 and a is b's only input: both carry 0.8 · 0.75 = 0.6
    assert feature_influence(toy("p", "2")) == pytest.approx({"tc/0/1": 0.6, "tc/1/2": 0.6})


def test_lsh_candidates_hold_every_similar_pair_and_few_others() -> None:
    weights, _ = planted_corpus()
    vectors = prompt_vectors(weights)
    dense = vectors.matrix.toarray()  # type: ignore[attr-defined]
    assert np.allclose(np.linalg.norm(dense, axis=1), 1.0)
    cosines = dense @ dense.T
    pairs = minhash_candidates(signatures(vectors))
    n = len(vectors.prompt_ids)
    similar = {(i, j) for i, j in itertools.combinations(range(n), 2) if cosines[i, j] >= 0.5}
    assert similar and similar <= pairs, "every pair within eps of each other is a candidate"
    assert len(pairs) < 0.45 * n * (n - 1) / 2, "cross-task pairs are mostly never compared"
    # the neighbour graph holds the exact cosines of the pairs it keeps
    graph = neighbour_graph(vectors, pairs, n_neighbours=10).tocoo()  # type: ignore[attr-defined]
    assert graph.nnz > 0
    for i, j, d in zip(graph.row, graph.col, graph.data, strict=True):
        assert d == pytest.approx(max(1 - cosines[i, j], 1e-12), abs=1e-12)
    assert min(np.bincount(graph.row)) >= 10, "every prompt keeps its own 10 nearest (others may choose it too)"
    csr = graph.tocsr()
    assert (csr != csr.T).nnz == 0, "symmetric"


def test_dbscan_recovers_the_planted_tasks_with_their_core_features() -> None:
    weights, group = planted_corpus(1)
    weights["loner"] = {"tc/8/0": 1.0}  # shares nothing: unclustered
    vectors = prompt_vectors(weights)
    labels = cluster_labels(neighbour_graph(vectors, minhash_candidates(signatures(vectors)), 10), eps=0.5)
    by_id = dict(zip(vectors.prompt_ids, labels.tolist(), strict=True))
    assert by_id.pop("loner") == -1
    partition = {frozenset(p for p in by_id if by_id[p] == c) for c in set(by_id.values())}
    assert partition == {frozenset(p for p in group if group[p] == g) for g in range(GROUPS)}
    motifs = {pid: ([f"logit:task{group[pid]}"] if int(pid[-2:]) % 2 else []) + ["logit:everywhere"]
              for pid in group}  # fmt: skip
    summaries = summarise(vectors, labels, motifs)
    assert [len(s.prompt_ids) for s in summaries] == [PER_GROUP] * GROUPS
    for s in summaries:
        g = group[s.prompt_ids[0]]
        assert {k for k, _ in s.features} <= {f"tc/{g}/{c}" for c in range(CORE)} and len(s.features) == 8
        assert s.motifs[0][0] == f"logit:task{g}", "the task's own motif before the one every prompt has"
        assert s.motifs[0][1] == pytest.approx(0.5) and dict(s.motifs)["logit:everywhere"] == pytest.approx(1 / 3)
        assert 0.5 < s.cohesion <= 1.0
    with pytest.raises(ClusterError, match="eps"):
        cluster_labels(neighbour_graph(vectors, set(), 1), eps=1.5)
    with pytest.raises(ClusterError, match="min_samples"):
        cluster_labels(neighbour_graph(vectors, set(), 1), min_samples=1)
