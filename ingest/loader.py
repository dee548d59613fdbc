"""The one loader: moves finished shards into Neo4j (`GraphWriter`) and DuckDB (`FeatureStatsStore`, one writer).

It runs in the client process while Dask workers keep computing. For each shard it asks Neo4j which of its prompts
are already stored (the store is the source of truth, so a reloaded shard writes nothing twice), writes the others
one transaction per prompt while a `BackgroundAggregator` adds the committed ones to the aggregate layer, then calls
`after_write` with the shard's prompt ids (the pipeline's hook, `atlas.storage.aggregate.update_for_prompts`, which
adds any the aggregator could not, e.g. after a crash or a restart of Neo4j), and queues the shard's
statistics (none for a shard whose every prompt failed: nothing of it is registered); `flush_stats()` merges queued
statistics shards into DuckDB in one snapshot (`FeatureStatsStore` skips shards it has already merged, so reruns
never double count) and copies the recomputed automatic labels onto the stored Features
(`labels.push_auto_labels`). Neo4j being unreachable (a restart) is waited out: writes are retried with back-off
for up to `retry_s` seconds.
This module never computes graphs and never opens DuckDB except through `FeatureStatsStore`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.compute as pc
import pyarrow.parquet as pq
from neo4j.exceptions import ServiceUnavailable, SessionExpired, TransientError

from atlas.storage.aggregate import AggregateBacklogError, BackgroundAggregator
from atlas.storage.feature_stats import FeatureStatsStore
from atlas.storage.labels import push_auto_labels
from atlas.storage.neo4j_writer import GraphWriter

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRYABLE = (ServiceUnavailable, SessionExpired, TransientError, ConnectionError, OSError)

# Called with a loaded shard's prompt ids, written now or before (the aggregate layer's hook; idempotent).
AfterWrite = Callable[[list[str]], None]


@dataclass(frozen=True)
class ShardLoad:
    written: list[str]  # prompt ids written now
    already: list[str]  # prompt ids the store already had
    n_nodes: int
    n_edges: int
    seconds: float
    retries: int


def retrying(action: Callable[[], T], *, retry_s: float, what: str, on_retry: Callable[[str], None] | None = None) -> T:
    """Run `action`, retrying Neo4j-unavailable errors with back-off (1 s → 8 s) for up to `retry_s` seconds."""
    deadline = time.monotonic() + retry_s
    delay = 1.0
    while True:
        try:
            return action()
        except RETRYABLE as err:
            if time.monotonic() + delay > deadline:
                raise RuntimeError(f"{what}: Neo4j still unavailable after {retry_s:.0f} s ({err})") from err
            log.warning("%s: %s; retrying in %.0f s", what, err, delay)
            if on_retry is not None:
                on_retry(f"{what}: {type(err).__name__}")
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


class StoreLoader:
    """Loads shards written by `ingest.worker.compute_batch` (see the module docstring)."""

    def __init__(
        self,
        writer: GraphWriter,
        stats: FeatureStatsStore,
        *,
        retry_s: float = 300.0,
        stats_every_s: float = 30.0,
        after_write: AfterWrite | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.writer = writer
        self.stats = stats
        self.retry_s = retry_s
        self.stats_every_s = stats_every_s
        self.after_write = after_write
        self.on_retry = on_retry
        self.retries = 0
        self.neo4j_seconds = 0.0
        self.stats_seconds = 0.0
        self.labels_changed = 0
        self._pending: list[Path] = []
        self._last_flush = time.monotonic()

    def _retry_note(self, message: str) -> None:
        self.retries += 1
        if self.on_retry is not None:
            self.on_retry(message)

    def existing(self, prompt_ids: Iterable[str], chunk: int = 5000) -> set[str]:
        """Which of `prompt_ids` Neo4j already has."""
        ids = list(prompt_ids)
        found: set[str] = set()
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]

            def query(part: list[str] = part) -> list[Any]:
                return self.writer.driver.execute_query(
                    "MATCH (p:Prompt) WHERE p.id IN $ids RETURN p.id AS id", ids=part, database_=self.writer.database
                ).records

            found.update(r["id"] for r in retrying(query, retry_s=self.retry_s, what="existence check",
                                                   on_retry=self._retry_note))  # fmt: skip
        return found

    def load_shard(self, shard: Path) -> ShardLoad:
        started = time.perf_counter()
        retries_before = self.retries
        prompts = pq.read_table(shard / "prompts.parquet")
        metas = {pid: json.loads(m) for pid, m in zip(*(prompts.column(c).to_pylist() for c in ("prompt_id", "meta")),
                                                        strict=True)}  # fmt: skip
        already = self.existing(metas)
        todo = [pid for pid in metas if pid not in already]
        n_nodes = n_edges = 0
        if todo:
            nodes = pq.read_table(shard / "nodes.parquet")
            edges = pq.read_table(shard / "edges.parquet")
            # The aggregate layer follows on a second server thread while the next prompts are written
            # (`GraphWriter.write_prompts(pipelined=True)` does the same); leaving the block waits for it.
            aggregator = BackgroundAggregator(self.writer.driver, database=self.writer.database)
            try:
                with aggregator:
                    for pid in todo:
                        prompt_nodes = nodes.filter(pc.equal(nodes.column("prompt_id"), pid))
                        prompt_edges = edges.filter(pc.equal(edges.column("prompt_id"), pid))

                        def write(pid: str = pid, n: Any = prompt_nodes, e: Any = prompt_edges) -> Any:
                            return self.writer.write_prompt(metas[pid], n, e, aggregator=aggregator)

                        result = retrying(write, retry_s=self.retry_s, what=f"write prompt {pid}",
                                          on_retry=self._retry_note)  # fmt: skip
                        n_nodes += result.n_nodes
                        n_edges += result.n_edges
            except AggregateBacklogError as err:
                if self.after_write is None:
                    raise
                log.warning("%s; the aggregate hook below adds them", err)  # it is retried, and idempotent
        if self.after_write is not None:
            # Every prompt of the shard, not only those written now: after a crash between the write and this call,
            # the resumed run skips the stored prompts but must still aggregate them (the hook is idempotent).
            hook, shard_ids = self.after_write, list(metas)
            retrying(lambda: hook(shard_ids), retry_s=self.retry_s, what="aggregate update", on_retry=self._retry_note)
        self.neo4j_seconds += time.perf_counter() - started
        if metas:  # a shard whose every prompt failed has no statistics to register
            self._pending += sorted(shard.glob("stats-*"))
        if time.monotonic() - self._last_flush >= self.stats_every_s:
            self.flush_stats()
        return ShardLoad(todo, sorted(already), n_nodes, n_edges, time.perf_counter() - started,
                         self.retries - retries_before)  # fmt: skip

    def flush_stats(self, *, logit_effects: Any = None) -> int:
        """Merge queued statistics shards (and optional logit effects) into DuckDB, then copy the recomputed automatic
        labels onto the stored Features; returns shards added."""
        self._last_flush = time.monotonic()
        if not self._pending and logit_effects is None:
            return 0
        started = time.perf_counter()
        self.stats.path.parent.mkdir(parents=True, exist_ok=True)
        added = self.stats.ingest(self._pending, logit_effects=logit_effects)
        self._pending = []
        # The statistics changed, so may the automatic labels: copy them onto the stored Features (changed ones only).
        writer = self.writer
        self.labels_changed += retrying(
            lambda: push_auto_labels(writer.driver, self.stats, database=writer.database),
            retry_s=self.retry_s, what="automatic labels", on_retry=self._retry_note,
        )  # fmt: skip
        self.stats_seconds += time.perf_counter() - started
        return added
