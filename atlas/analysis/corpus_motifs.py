"""Motifs of the stored corpus: which prompts to (re-)mine, mining them, and writing the result, in batches.

Glue between `atlas.storage.motifs` (Neo4j reads and writes) and the pure miner `atlas.analysis.motifs`; it holds no
mining logic of its own. `mine_store(full=True)` re-mines every prompt (deleting every motif first);
`mine_store(full=False)` is the incremental update described in `atlas.storage.motifs`.
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
    n_prompts: int  # prompts in the store
    mined: int  # prompts (re-)mined by this call
    removed: int  # motifs refreshed because their prompts were deleted
    touched: int  # motifs whose sums changed
    timings: dict[str, float] = field(default_factory=dict)


def mine_store(
    driver: Driver, database: str, *, full: bool, min_strength: float = 0.01, max_features: int = 4,
    batch: int = 64, progress: Callable[[int, int], None] | None = None,
) -> MiningReport:  # fmt: skip
    """Mine the store's prompts (all of them, or only the new and re-ingested ones) into `(:Motif)` nodes."""
    check_parameters(min_strength, max_features)
    started = time.perf_counter()
    stamps = store.prompt_stamps(driver, database)
    if not stamps:
        raise store.MotifStoreError("the store holds no prompts; ingest some first (`atlas ingest` or `atlas demo`)")
    store.ensure_motif_schema(driver, database)
    run = store.motif_run(driver, database)
    if not full and run is not None and (run["min_strength"], run["max_features"]) != (min_strength, max_features):
        raise store.MotifStoreError(
            f"the stored motifs were mined with min_strength {run['min_strength']}, max_features "
            f"{run['max_features']}; an update must use the same (or run `atlas global motifs mine` to re-mine)"
        )
    if full:
        store.clear_motifs(driver, database)
        todo = sorted(stamps)
    else:
        mined = store.mined_stamps(driver, database)
        todo = sorted(pid for pid, at in stamps.items() if mined.get(pid) != at)
    timings = {"plan": time.perf_counter() - started}
    removed = 0 if full else store.refresh_orphans(driver, database)
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
        touched |= store.write_contributions(driver, database, contributions, stamps,
                                             min_strength=min_strength, max_features=max_features)  # fmt: skip
        t3 = time.perf_counter()
        read_s, mine_s, write_s = read_s + t1 - t0, mine_s + t2 - t1, write_s + t3 - t2
        if progress is not None:
            progress(min(start + batch, len(todo)), len(todo))
    if not todo and run is None:  # nothing to mine and nothing stored: still record the parameters
        store.write_contributions(driver, database, {}, stamps, min_strength=min_strength, max_features=max_features)
    store.set_run_prompts(driver, database)
    timings.update({"read graphs": read_s, "mine": mine_s, "write": write_s})
    logger.info("motifs: %s", ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return MiningReport(len(stamps), len(todo), removed, len(touched), timings)
