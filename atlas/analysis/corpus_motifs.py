"""Corpus structure of the stored graphs: motifs (which prompts to (re-)mine, mining, writing) and prompt clusters.

Glue between `atlas.storage.motifs` (Neo4j reads and writes) and the pure miner `atlas.analysis.motifs`; it holds no
mining logic of its own. Both work on one dictionary's prompts (`transcoder`; None: the store's only dictionary, an
error naming the stored ones when there are several), and write only that dictionary's nodes.
`mine_store(full=True)` re-mines every prompt of the dictionary (deleting its motifs first); `mine_store(full=False)`
is the incremental update described in `atlas.storage.motifs`. `cluster_store` reads the dictionary's prompt graphs,
clusters with `atlas.analysis.clusters` and replaces its `(:Cluster)` nodes (`atlas.storage.clusters`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from neo4j import Driver

from atlas.analysis.motifs import PromptGraph, check_parameters, motif_key, prompt_paths
from atlas.storage import motifs as store

logger = logging.getLogger(__name__)


@dataclass
class MiningReport:
    transcoder: str  # the dictionary mined
    n_prompts: int  # its prompts in the store
    mined: int  # prompts (re-)mined by this call
    removed: int  # motifs refreshed because their prompts were deleted
    touched: int  # motifs whose sums changed
    timings: dict[str, float] = field(default_factory=dict)


def mine_store(
    driver: Driver, database: str, *, full: bool, transcoder: str | None = None, min_strength: float = 0.01,
    max_features: int = 4, batch: int = 64, progress: Callable[[int, int], None] | None = None,
) -> MiningReport:  # fmt: skip
    """Mine one dictionary's prompts (all of them, or only the new and re-ingested ones) into `(:Motif)` nodes."""
    check_parameters(min_strength, max_features)
    started = time.perf_counter()
    tc = store.resolve_dictionary(driver, database, transcoder)  # before any write: no prompts is an error
    stamps = store.prompt_stamps(driver, database, tc)
    store.ensure_motif_schema(driver, database)
    run = store.motif_run(driver, database, tc)
    if not full and run is not None and (run["min_strength"], run["max_features"]) != (min_strength, max_features):
        raise store.MotifStoreError(
            f"the stored motifs were mined with min_strength {run['min_strength']}, max_features "
            f"{run['max_features']}; an update must use the same (or run `atlas global motifs mine` to re-mine)"
        )
    if full:
        store.clear_motifs(driver, database, tc)
        todo = sorted(stamps)
    else:
        mined = store.mined_stamps(driver, database, tc)
        todo = sorted(pid for pid, at in stamps.items() if mined.get(pid) != at)
    timings = {"plan": time.perf_counter() - started}
    removed = 0 if full else store.refresh_orphans(driver, database, tc)
    timings["deleted prompts"] = time.perf_counter() - started - timings["plan"]
    read_s = mine_s = write_s = 0.0
    touched: set[str] = set()
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        t0 = time.perf_counter()
        graphs = store.read_prompt_graphs(driver, database, chunk)
        t1 = time.perf_counter()
        contributions = {}
        for g in graphs:
            paths = prompt_paths(PromptGraph(**g), min_strength=min_strength, max_features=max_features)
            contributions[g["prompt_id"]] = [
                {"key": motif_key(kind, nodes), "kind": kind, "nodes": nodes, "strength": c.strength,
                 "n_paths": c.n_paths}
                for (kind, nodes), c in paths.items()
            ]  # fmt: skip
        t2 = time.perf_counter()
        touched |= store.write_contributions(driver, database, contributions, stamps, transcoder=tc,
                                             min_strength=min_strength, max_features=max_features)  # fmt: skip
        t3 = time.perf_counter()
        read_s, mine_s, write_s = read_s + t1 - t0, mine_s + t2 - t1, write_s + t3 - t2
        if progress is not None:
            progress(min(start + batch, len(todo)), len(todo))
    if not todo and run is None:  # nothing to mine and nothing stored: still record the parameters
        store.write_contributions(driver, database, {}, stamps, transcoder=tc, min_strength=min_strength,
                                  max_features=max_features)  # fmt: skip
    store.set_run_prompts(driver, database, tc)
    timings.update({"read graphs": read_s, "mine": mine_s, "write": write_s})
    logger.info("motifs of %s: %s", tc, ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return MiningReport(tc, len(stamps), len(todo), removed, len(touched), timings)


@dataclass
class ClusterReport:
    transcoder: str
    n_prompts: int
    n_clusters: int
    n_unclustered: int
    candidate_pairs: int
    all_pairs: int
    timings: dict[str, float] = field(default_factory=dict)


def cluster_store(
    driver: Driver, database: str, *, transcoder: str | None = None, eps: float = 0.3, min_samples: int = 2,
    n_neighbours: int = 15, signature_features: int = 32, batch: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> ClusterReport:  # fmt: skip
    """Cluster one dictionary's stored prompts by shared circuitry and replace its `(:Cluster)` nodes."""
    from atlas.analysis.clusters import (
        cluster_labels,
        feature_influence,
        minhash_candidates,
        neighbour_graph,
        prompt_vectors,
        summarise,
    )
    from atlas.storage.clusters import replace_clusters

    # parameter checks before any read (the same checks the functions below make)
    if not 0.0 < eps < 1.0 or min_samples < 2 or n_neighbours < 1 or signature_features < 1:
        raise ValueError(
            f"eps must be in (0, 1), min_samples ≥ 2, n_neighbours ≥ 1, signature_features ≥ 1; got {eps}, "
            f"{min_samples}, {n_neighbours}, {signature_features}"
        )
    t0 = time.perf_counter()
    tc = store.resolve_dictionary(driver, database, transcoder)  # no prompts of it: an error, nothing written
    prompt_ids = sorted(store.prompt_stamps(driver, database, tc))
    weights: dict[str, dict[str, float]] = {}
    for start in range(0, len(prompt_ids), batch):
        for g in store.read_prompt_graphs(driver, database, prompt_ids[start : start + batch]):
            weights[g["prompt_id"]] = feature_influence(PromptGraph(**g))
        if progress is not None:
            progress(min(start + batch, len(prompt_ids)), len(prompt_ids))
    t1 = time.perf_counter()
    vectors = prompt_vectors(weights)
    matrix = vectors.matrix
    signatures = []
    for i in range(len(vectors.prompt_ids)):
        row = matrix.getrow(i)  # type: ignore[attr-defined]
        top = row.indices[(-row.data).argsort(kind="stable")[:signature_features]]
        signatures.append(top.tolist())
    pairs = minhash_candidates(signatures)
    distances = neighbour_graph(vectors, pairs, n_neighbours)
    labels = cluster_labels(distances, eps=eps, min_samples=min_samples)
    t2 = time.perf_counter()
    contributions = store.motif_contributions(driver, database, tc)
    prompt_motifs = {pid: [r["key"] for r in rows] for pid, rows in contributions.items()}
    summaries = summarise(vectors, labels, prompt_motifs)
    n = len(vectors.prompt_ids)
    unclustered = int((labels < 0).sum())
    run = {"eps": eps, "min_samples": min_samples, "n_neighbours": n_neighbours, "n_prompts": n,
           "n_clusters": len(summaries), "n_unclustered": unclustered, "candidate_pairs": len(pairs)}  # fmt: skip
    replace_clusters(
        driver, database, tc,
        [{"index": s.index, "prompt_ids": s.prompt_ids, "features": s.features, "motifs": s.motifs,
          "cohesion": s.cohesion} for s in summaries],
        run,
    )  # fmt: skip
    t3 = time.perf_counter()
    timings = {"read + influence": t1 - t0, "vectors + LSH + DBSCAN": t2 - t1, "summarise + write": t3 - t2}
    logger.info("clusters of %s: %s", tc, ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return ClusterReport(tc, n, len(summaries), unclustered, len(pairs), n * (n - 1) // 2, timings)
