"""The aggregate layer: one `:AGG_EDGE` per (Feature, Feature|Token) pair, summed over every stored prompt.

    (:Feature)-[:AGG_EDGE {pair, n_prompts, n_edges, sum_weight_fx, sum_abs_weight_fx, max_abs_weight}]->
        (:Feature | :Token)

`pair` is the relationship's indexed key: `f.h * 2^31 + t.h` (`pair_key`), from the 31-bit hashes of the two node
keys that Features and Tokens carry as `h` (`node_hash`, set when the writer creates them). Updates find a pair's
relationship by an index seek on `pair` that also checks both endpoints, so two pairs whose hashes collide stay
apart (the seek then returns both); the cost does not grow with the store, where a MERGE scans the AGG_EDGE chains
of popular Features and Tokens. An integer key and six properties instead of a string key and nine took the
batched update from 82 to 64 ms per 4k-edge prompt (`benchmarks/neo4j_load.py` data).

A prompt contributes to the pair (F, X) through its attribution edges `(a:FeatureActivation)-[:EDGE]->(b)` with
`a -[:OF]-> F` and `b -[:OF]-> X`, where `b` is a `FeatureActivation` (X a Feature) or a vocabulary `LogitTarget`
(X a Token; custom-direction logits have no Token and are not aggregated; input tokens and error nodes are never
sources here). A feature active at several positions of a prompt contributes all its edges to the pair:

    n_prompts          prompts with at least one such edge
    n_edges            such edges over all prompts
    sum_weight_fx      sum of their signed weights, in fixed point: sum_weight = sum_weight_fx / 2^32
    sum_abs_weight_fx  sum of their |weight|, likewise: sum_abs_weight = sum_abs_weight_fx / 2^32
    max_abs_weight     the largest |weight| of any such edge
    (derived, not stored: mean_weight = sum_weight / n_prompts, the mean per-prompt contribution over the prompts
    that have one; readers project all of them with `AGG_VALUES`)

Maintenance is INCREMENTAL, in one of two ways, and the `aggregated` flag of each Prompt says whether the layer
counts it, so the layer always equals the sum over exactly the flagged prompts:
- pipelined (`GraphWriter.write_prompts`, the ingest loader): each prompt's graph is committed in a transaction of
  its own and handed to a `BackgroundAggregator`, whose thread adds the queued prompts in batches
  (`update_for_prompts`) while the next graphs are written. Graph writes and aggregate sweeps then run on two
  server threads at once, where in-transaction maintenance keeps one busy; the layer lags the prompts in flight;
- in-transaction (`GraphWriter.write_prompt`, `write_prompts(pipelined=False)`): writing a prompt adds its
  contributions after creating its edges and marks it `aggregated: true`, in the same transaction.
Either way, re-writing an aggregated prompt reads the old version's contributions from its old edges before they
are deleted and subtracts them in the same final sweep that adds the new ones, inside the re-writing transaction;
deleting it subtracts them too. Only the pairs the prompt touches are updated, in ONE sweep sorted by
(F key, X key) at the end of the transaction, after every node lock of the prompt was taken: two writers thus lock
shared aggregate relationships in one global order. Transactions that change the layer also take a database-wide
lock (`lock_aggregates`), so they run one at a time: relationship-group locks of dense Feature nodes deadlocked two
writer threads otherwise (a graph transaction and an aggregator batch can still deadlock on node locks now and then;
the server detects it and the driver retries the transaction). A prompt written with `aggregates=False`
contributes nothing and is never subtracted, until `update_for_prompts` or a rebuild adds it. A pair whose
`n_prompts` reaches 0 is deleted. `max_abs_weight` cannot be subtracted: when the removed version held the maximum
and the new one does not reach it, it is recomputed from the pair's current edges (rare for popular pairs, cheap
for rare ones; a subtraction with no addition after it, such as a delete, recomputes every pair whose maximum it
held, which is slow for popular pairs).

Exactness: sums are accumulated in fixed point, as integers of `1 / FIXED_POINT_SCALE` (2^-32, each edge weight
rounded once), so additions and subtractions are exact and order-independent, and the incremental aggregate equals
a from-scratch rebuild *exactly*, whatever the sequence of writes, replacements and deletes. The float sums are
derived from the integers when read (`AGG_VALUES`), not stored: three fewer properties per relationship. (The
rounding error of one edge is at most 1.2e-10, far below the float32 precision of attribution weights.)

Public API (for the ingest pipeline and tests):
- nothing to call after `GraphWriter.write_prompt(s)` / `delete_prompt`: they maintain the layer;
- `BackgroundAggregator(driver, database=...)`: `submit` committed prompt ids, `drain` / `close` wait until they
  are in (the pipelined writers use it);
- `update_for_prompts(driver, prompt_ids, database=...)`: add the prompts not aggregated yet (idempotent; a no-op
  for prompts the default writer wrote), in batches of prompts that share one sweep — the hook the ingest pipeline
  calls for every shard it loads and for the prompts a rerun finds stored, so prompts written with
  `GraphWriter(aggregates=False)` (deferred maintenance: a Prompt's `aggregated` flag says whether the layer counts
  it yet) or left behind by a crash are brought in. Measured (`benchmarks/neo4j_load.py`, 200 prompts of 4,000
  edges right after their write, 128 MiB page cache): 59-69 ms per prompt in batches of 32; batches pay off when
  pairs recur across the batch (10 % of pairs did in that synthetic data);
- `rebuild_aggregates(driver, database, transcoder=None)`: delete and recompute the layer from the prompt graphs
  (all of it, or the Features of one transcoder) in batched transactions; for bulk loads done with
  `GraphWriter(aggregates=False)`, and as the reference in tests;
- `aggregate_rows(driver, database, transcoder)`: the layer's content for one transcoder, sorted (for comparisons).

This module must not write prompt graphs (that is `neo4j_writer`), nor read Parquet/DuckDB.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, LiteralString

from neo4j import Driver, ManagedTransaction

from atlas.storage.graph_schema import SCHEMA_VERSION, STORE_NAME

log = logging.getLogger(__name__)

AGG_EDGE = "AGG_EDGE"
FIXED_POINT_SCALE = 4294967296.0  # 2^32: one unit of the integer sums is 2^-32 of a weight unit

HASH_BITS = 31  # node hashes are in [0, 2^31): a pair key f.h * 2^31 + t.h stays below 2^62, a Cypher integer

# The relationship's key for bound `f`, `t` (indexed, `atlas_agg_pair`). A node without `h` (not created by the
# writer) counts as -1: its pairs then share keys, which the endpoint check of every seek keeps apart.
_PAIR: LiteralString = "coalesce(f.h, -1) * 2147483648 + coalesce(t.h, -1)"

# Each aggregate relationship `g` as read by the query library and `aggregate_rows`: stored and derived values.
AGG_VALUES: LiteralString = """{n_prompts: g.n_prompts, n_edges: g.n_edges, max_abs_weight: g.max_abs_weight,
  sum_weight_fx: g.sum_weight_fx, sum_abs_weight_fx: g.sum_abs_weight_fx,
  sum_weight: toFloat(g.sum_weight_fx) / 4294967296.0, sum_abs_weight: toFloat(g.sum_abs_weight_fx) / 4294967296.0,
  mean_weight: toFloat(g.sum_weight_fx) / 4294967296.0 / g.n_prompts}"""
# `g.sum_abs_weight_fx` as a float weight, for filters and ordering.
AGG_SUM_ABS: LiteralString = "(toFloat(g.sum_abs_weight_fx) / 4294967296.0)"
assert FIXED_POINT_SCALE == 4294967296.0, "AGG_VALUES and AGG_SUM_ABS spell the scale out"


def node_hash(key: str) -> int:
    """The `h` of the Feature or Token with this key: 31 bits of its BLAKE2b digest (stable across runs)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big") >> (32 - HASH_BITS)


def pair_key(source_key: str, target_key: str) -> int:
    """The `pair` of the AGG_EDGE from Feature `source_key` to the Feature or Token `target_key`."""
    return node_hash(source_key) * (1 << HASH_BITS) + node_hash(target_key)


# A prompt's contribution to each (F, X) pair it touches, computed from its stored edges. Columns: f, t (nodes),
# n (edges), s / sa (fixed-point sums of weight and |weight|), mx (max |weight|).
_CONTRIBUTIONS: LiteralString = """
MATCH (a:Instance) WHERE a.prompt_id = $pid AND a.node_index IS NOT NULL AND a:FeatureActivation
MATCH (a)-[e:EDGE]->(b) WHERE b:FeatureActivation OR b:LogitTarget
MATCH (a)-[:OF]->(f:Feature)
MATCH (b)-[:OF]->(t)
"""
_SUMS: LiteralString = """count(e) AS n, sum(toInteger(round(e.weight * $scale))) AS s,
       sum(toInteger(round(abs(e.weight) * $scale))) AS sa, max(abs(e.weight)) AS mx"""

# Read (no locks) BEFORE the old version's nodes are deleted; one record of parallel lists, kept by the client.
READ_CONTRIBUTIONS: LiteralString = (
    _CONTRIBUTIONS
    + "WITH f, t, "
    + _SUMS
    + """
RETURN collect([f.key, t.key, n, s, sa, mx]) AS ff_tt, collect(t:Feature) AS is_feature
"""
)

# Find a pair's relationship by an index seek on its key (the hint keeps the planner from expanding the endpoints'
# AGG_EDGE chains instead; the pattern checks both endpoints), or create it: `MERGE (f)-[g:AGG_EDGE]->(t)` scans the
# chain of the smaller endpoint, and popular Features and logit Tokens hold thousands, so its cost grew with the
# store (76 -> 149 ms per 4k-edge prompt between 200 and 900 stored prompts). Writers of the layer are serialised by
# `lock_aggregates`, so find-then-create cannot race. Exactly one branch returns a row.
_UPSERT: LiteralString = (
    """
WITH *, """
    + _PAIR
    + """ AS pair
OPTIONAL MATCH (f)-[found:AGG_EDGE {pair: pair}]->(t) USING INDEX found:AGG_EDGE(pair)
CALL (f, t, found, pair) {
  WITH f, t, pair WHERE found IS NULL
  CREATE (f)-[made:AGG_EDGE {pair: pair}]->(t)
  RETURN made AS g
  UNION ALL
  WITH found WHERE found IS NOT NULL
  RETURN found AS g
}
"""
)

# A pair's new state in ONE map update (`g`, its new `np` prompts and `sfx` / `safx` fixed-point sums, `n` more edges,
# the batch's largest |weight| `new_mx` against the stored `current`), measured 14 % faster per pair than one SET
# per property. A relationship `_UPSERT` has just created holds only its `pair`, hence the coalesce(..., 0) in the
# callers.
_SET_ALL: LiteralString = """
SET g += {n_prompts: np, n_edges: coalesce(g.n_edges, 0) + n, sum_weight_fx: sfx, sum_abs_weight_fx: safx,
          max_abs_weight: CASE WHEN coalesce(new_mx, -1.0) > current THEN new_mx ELSE current END}
"""

# ONE sweep over every pair whose aggregate changes: the new version's contributions (from its edges, when $add) and
# minus the old version's (rows read before its deletion: $old_ff feature targets, $old_ft token targets), summed per
# pair and applied in (F key, X key) order. A single ordered sweep, after all node locks of the prompt transaction
# were taken, is what keeps concurrent writers free of deadlocks on shared aggregate relationships. A pair's maximum
# is recomputed from its current edges (this prompt's new ones included) only when the old version held it and the
# new one does not reach it.
APPLY: LiteralString = (
    """
CALL () {
"""
    + _CONTRIBUTIONS
    + """
  WITH f, t, e WHERE $add
  RETURN f, t, 1 AS dp, """
    + _SUMS
    + """
  UNION ALL
  UNWIND $old_ff AS r
  MATCH (f:Feature {key: r[0]}) MATCH (t:Feature {key: r[1]})
  RETURN f, t, -1 AS dp, -r[2] AS n, -r[3] AS s, -r[4] AS sa, r[5] AS mx
  UNION ALL
  UNWIND $old_ft AS r
  MATCH (f:Feature {key: r[0]}) MATCH (t:Token {key: r[1]})
  RETURN f, t, -1 AS dp, -r[2] AS n, -r[3] AS s, -r[4] AS sa, r[5] AS mx
}
WITH f, t, sum(dp) AS dp, sum(n) AS n, sum(s) AS s, sum(sa) AS sa,
     max(CASE WHEN dp > 0 THEN mx END) AS new_mx, max(CASE WHEN dp < 0 THEN mx END) AS old_mx
ORDER BY f.key, t.key
"""
    + _UPSERT
    + """
WITH f, t, g, n, new_mx, old_mx, coalesce(g.max_abs_weight, 0.0) AS current, coalesce(g.n_prompts, 0) + dp AS np,
     coalesce(g.sum_weight_fx, 0) + s AS sfx, coalesce(g.sum_abs_weight_fx, 0) + sa AS safx
"""
    + _SET_ALL
    + """
WITH f, t, g, np <= 0 AS gone,
     old_mx IS NOT NULL AND old_mx >= current AND coalesce(new_mx, -1.0) < old_mx AS stale
CALL (f, t, g, gone, stale) {
  WITH f, t, g WHERE stale AND NOT gone
  MATCH (f)<-[:OF]-(a:FeatureActivation)-[e:EDGE]->(b)-[:OF]->(t)
  WHERE b:FeatureActivation OR b:LogitTarget
  WITH g, max(abs(e.weight)) AS m
  SET g.max_abs_weight = m
}
CALL (g, gone) {
  WITH g WHERE gone
  DELETE g
}
"""
)

# Add the contributions of the prompts `$pids` (none of them aggregated yet) in ONE sweep: group their edges by
# (F, X, prompt), then by pair, so a pair several of the prompts share is merged and updated once. Add-only: no
# maximum can go stale. Sorted by pair key like APPLY (the same lock order for the aggregate relationships).
ADD_MANY: LiteralString = (
    """
MATCH (a:Instance) WHERE a.prompt_id IN $pids AND a.node_index IS NOT NULL AND a:FeatureActivation
MATCH (a)-[e:EDGE]->(b) WHERE b:FeatureActivation OR b:LogitTarget
MATCH (a)-[:OF]->(f:Feature)
MATCH (b)-[:OF]->(t)
WITH f, t, a.prompt_id AS pid, """
    + _SUMS
    + """
WITH f, t, count(pid) AS dp, sum(n) AS n, sum(s) AS s, sum(sa) AS sa, max(mx) AS mx
ORDER BY f.key, t.key
"""
    + _UPSERT
    + """
WITH g, n, mx AS new_mx, coalesce(g.max_abs_weight, 0.0) AS current, coalesce(g.n_prompts, 0) + dp AS np,
     coalesce(g.sum_weight_fx, 0) + s AS sfx, coalesce(g.sum_abs_weight_fx, 0) + sa AS safx
"""
    + _SET_ALL
)

# The flag is read as `properties(p).aggregated` in every statement, never `p.aggregated`: on a store where no
# Prompt has been flagged yet the property key does not exist, and the server answers `p.aggregated` with an
# "unknown property key" warning notification, which the driver logs (once per ingest, on every new store, with
# nothing for the user to do). `properties(p)` names no key, so the plan is the same and no notification is sent.
# Stored Prompts among $pids not aggregated yet (read without locks), in chunks of `_READ_CHUNK` ids.
_UNAGGREGATED: LiteralString = """
UNWIND $pids AS pid
MATCH (p:Prompt {id: pid}) WHERE NOT coalesce(properties(p).aggregated, false)
RETURN p.id AS id ORDER BY id
"""
_READ_CHUNK = 5000

_READ_FLAG: LiteralString = "MATCH (p:Prompt {id: $pid}) RETURN properties(p).aggregated AS a"

# Write-lock the Prompts among $pids (sorted by the caller) and flag the ones not aggregated yet; returns those. The
# flag read in the first SET may predate a transaction that held the lock, but every transaction that sets the flag
# true holds the aggregate lock, as the claimer does, so none can commit in between.
_CLAIM_UNAGGREGATED: LiteralString = """
UNWIND $pids AS pid
MATCH (p:Prompt {id: pid})
SET p.aggregated = coalesce(properties(p).aggregated, false)
WITH p WHERE NOT properties(p).aggregated
SET p.aggregated = true
RETURN p.id AS id
"""

# From scratch for one Feature `f` (bound by the caller): group its edges by (target identity, prompt), then by
# target. Independent of the per-prompt statements above, which makes it a reference for them.
_REBUILD_FROM_FEATURE: LiteralString = (
    """
  MATCH (f)<-[:OF]-(a:FeatureActivation)-[e:EDGE]->(b)-[:OF]->(t)
  WHERE b:FeatureActivation OR b:LogitTarget
  WITH f, t, a.prompt_id AS pid, count(e) AS n, sum(toInteger(round(e.weight * $scale))) AS s,
       sum(toInteger(round(abs(e.weight) * $scale))) AS sa, max(abs(e.weight)) AS mx
  WITH f, t, count(pid) AS np, sum(n) AS n, sum(s) AS s, sum(sa) AS sa, max(mx) AS mx
  CREATE (f)-[g:AGG_EDGE {n_prompts: np, n_edges: n, sum_weight_fx: s, sum_abs_weight_fx: sa, max_abs_weight: mx}]->(t)
  SET g.pair = """
    + _PAIR
    + """
"""
)

_FEATURES_ALL: LiteralString = "MATCH (f:Feature)"
_FEATURES_OF: LiteralString = "MATCH (f:Feature) WHERE f.transcoder = $transcoder"


@dataclass(frozen=True)
class AggregateRow:
    """One aggregate relationship, as stored (see the module docstring for the meaning of each field)."""

    source_key: str
    target_key: str
    target_kind: str  # "feature" | "token"
    n_prompts: int
    n_edges: int
    sum_weight: float
    sum_abs_weight: float
    mean_weight: float
    max_abs_weight: float
    sum_weight_fx: int
    sum_abs_weight_fx: int


@dataclass(frozen=True)
class RebuildResult:
    relationships: int
    seconds: float


@dataclass(frozen=True)
class Contributions:
    """A stored prompt version's contributions, read before it is deleted: rows [F key, X key, n, s, sa, mx]."""

    to_features: list[list[Any]]
    to_tokens: list[list[Any]]


def read_contributions(tx: ManagedTransaction, prompt_id: str) -> Contributions:
    """The stored version's contributions (call before deleting its nodes; takes no locks)."""
    record = tx.run(READ_CONTRIBUTIONS, pid=prompt_id, scale=FIXED_POINT_SCALE).single()
    if record is None:
        return Contributions([], [])
    rows, is_feature = record["ff_tt"], record["is_feature"]
    return Contributions(
        [r for r, f in zip(rows, is_feature, strict=True) if f],
        [r for r, f in zip(rows, is_feature, strict=True) if not f],
    )


def apply_prompt(tx: ManagedTransaction, prompt_id: str, *, add: bool, old: Contributions | None) -> None:
    """Add the prompt's current contributions (`add`) and remove `old` ones in one ordered sweep; `add` also marks
    the Prompt `aggregated`. Call last in the prompt's transaction (after its nodes and edges are written/deleted)."""
    subtract = old is not None and bool(old.to_features or old.to_tokens)
    if not add and not subtract:
        return
    if not subtract:  # a new prompt: the add-only sweep, without the subtraction's union and subqueries
        tx.run(ADD_MANY, pids=[prompt_id], scale=FIXED_POINT_SCALE).consume()
    else:
        assert old is not None
        tx.run(
            APPLY, pid=prompt_id, add=add, old_ff=old.to_features, old_ft=old.to_tokens, scale=FIXED_POINT_SCALE
        ).consume()
    if add:
        tx.run("MATCH (p:Prompt {id: $pid}) SET p.aggregated = true", pid=prompt_id).consume()


def lock_aggregates(tx: ManagedTransaction) -> None:
    """Take the database-wide aggregate lock (a write on the `SchemaVersion` node, held until the transaction ends).

    Every transaction that may change the layer takes it FIRST, so such transactions run one at a time. Ordering the
    sweep by pair key is not enough on its own: creating or deleting relationships of dense Feature nodes takes
    relationship-group locks in an order no sort of the pairs controls, and two writer threads deadlocked there
    repeatedly, past the driver's 30 s retry budget. Two writer threads gained nothing on 2 cores anyway.
    """
    tx.run(
        "MATCH (v:SchemaVersion {name: $name}) SET v.aggregate_writes = coalesce(v.aggregate_writes, 0) + 1",
        name=STORE_NAME,
    ).consume()


def _lock_and_read_flag(tx: ManagedTransaction, prompt_id: str) -> bool | None:
    """Write-lock the Prompt (serialises with its writers), then return its `aggregated` flag; None if absent.

    Two statements, and the lock taken by writing a constant: an expression in the locking statement is evaluated
    before the lock is granted, so it could read (and write back) the flag from before the transaction holding the
    lock committed."""
    tx.run("MATCH (p:Prompt {id: $pid}) SET p.schema_version = $v", pid=prompt_id, v=SCHEMA_VERSION).consume()
    record = tx.run(_READ_FLAG, pid=prompt_id).single()
    return None if record is None else bool(record["a"])


def contributions_before_delete(tx: ManagedTransaction, prompt_id: str) -> Contributions | None:
    """Before deleting a prompt: take the aggregate lock, lock the prompt, read its contributions if it is
    aggregated (else None)."""
    lock_aggregates(tx)
    return read_contributions(tx, prompt_id) if _lock_and_read_flag(tx, prompt_id) else None


def update_for_prompts(
    driver: Driver, prompt_ids: Iterable[str], *, database: str = "neo4j", prompts_per_tx: int = 32
) -> int:
    """Add the contributions of stored prompts that are not aggregated yet; idempotent. Returns how many were added.

    Prompts go in sorted batches of `prompts_per_tx`, one transaction each: it takes the aggregate lock, write-locks
    and flags the batch's un-aggregated Prompts, and adds all their contributions in ONE sweep (`ADD_MANY`), so a
    pair the prompts share is merged once per batch rather than once per prompt. Prompts written by
    `GraphWriter(aggregates=True)` are already aggregated, so this is then a flag read per prompt; after a
    `GraphWriter(aggregates=False)` load it brings those prompts in. Unknown prompt ids are skipped. A failure rolls
    back its batch only: earlier batches stay added, and calling again resumes.
    """
    if prompts_per_tx < 1:
        raise ValueError("prompts_per_tx must be positive")
    # A lock-free read first: a rerun passes every stored prompt, nearly all aggregated already, and should not take
    # the database-wide aggregate lock once per batch for nothing. The claim below re-checks under the lock.
    requested = sorted(set(prompt_ids))
    ids: list[str] = []
    for start in range(0, len(requested), _READ_CHUNK):
        ids += [
            record["id"]
            for record in driver.execute_query(
                _UNAGGREGATED, pids=requested[start : start + _READ_CHUNK], database_=database
            ).records
        ]

    def work(tx: ManagedTransaction, pids: list[str]) -> int:
        lock_aggregates(tx)
        todo = [record["id"] for record in tx.run(_CLAIM_UNAGGREGATED, pids=pids)]
        if todo:
            tx.run(ADD_MANY, pids=todo, scale=FIXED_POINT_SCALE).consume()
        return len(todo)

    added = 0
    with driver.session(database=database) as session:
        for start in range(0, len(ids), prompts_per_tx):
            added += session.execute_write(work, ids[start : start + prompts_per_tx])
    return added


class AggregateBacklogError(RuntimeError):
    """Prompts were written but could not be added to the aggregate layer; they stay flagged `aggregated: false`, and
    `update_for_prompts` (idempotent) adds them once the cause is gone. Nothing stored is lost or counted twice."""

    def __init__(self, prompt_ids: list[str], cause: BaseException) -> None:
        self.prompt_ids = prompt_ids
        super().__init__(
            f"{len(prompt_ids)} written prompt(s) are not in the aggregate layer yet ({type(cause).__name__}: "
            f"{cause}); update_for_prompts(driver, ids) adds them (idempotent), e.g. {prompt_ids[:3]}"
        )


class BackgroundAggregator:
    """Adds committed prompts to the aggregate layer on a thread of its own, in batches, while the caller writes more.

    `submit(prompt_id)` after a prompt's graph transaction committed (`GraphWriter.write_prompt(..., aggregator=)`
    does it); the thread takes whatever has queued up, up to `max_batch` prompts, and adds it with
    `update_for_prompts` (one transaction per batch). The server then runs a graph write and an aggregate sweep at
    once, on two cores, where in-transaction maintenance runs them one after the other on one. `drain()` waits until
    every submitted prompt is added; `close()` (or leaving the `with` block) drains and stops the thread.

    Exactness is that of `update_for_prompts`: the layer always equals the sum over the prompts flagged
    `aggregated`, and lags the prompts still queued. A batch that fails (the server restarting, say) is retried once
    by `drain()` in the caller's thread; if that fails too, `drain()` raises `AggregateBacklogError` naming the
    prompts, which stay un-aggregated (never half-added: a batch is one transaction) for a later
    `update_for_prompts`.
    """

    def __init__(self, driver: Driver, *, database: str = "neo4j", max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be positive")
        self.driver = driver
        self.database = database
        self.max_batch = max_batch
        self.added = 0  # prompts this aggregator added to the layer
        self.batches = 0
        self.seconds = 0.0  # time spent in update transactions, on the aggregator's thread
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._failed: list[str] = []
        self._error: BaseException | None = None
        self._closed = False

    def submit(self, prompt_id: str) -> None:
        """Queue a committed prompt for the layer (returns at once)."""
        if self._closed:
            raise RuntimeError("this BackgroundAggregator is closed")
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="atlas-aggregator", daemon=True)
                self._thread.start()
        self._queue.put(prompt_id)

    def drain(self) -> int:
        """Wait until every submitted prompt is added; returns how many this aggregator has added so far."""
        self._queue.join()
        with self._lock:
            failed, error = self._failed, self._error
            self._failed, self._error = [], None
        if failed:
            assert error is not None
            log.warning("aggregate update of %d prompts failed (%s); retrying once", len(failed), error)
            try:
                self.added += update_for_prompts(
                    self.driver, failed, database=self.database, prompts_per_tx=self.max_batch
                )
            except Exception as exc:
                raise AggregateBacklogError(sorted(failed), exc) from exc
        return self.added

    def close(self) -> None:
        """Drain, then stop the thread (idempotent)."""
        if self._closed:
            return
        try:
            self.drain()
        finally:
            self._stop()

    def _stop(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> BackgroundAggregator:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the caller failed: still add what it committed, but do not mask its error
            self.drain()
        except Exception as drain_error:
            log.warning("%s", drain_error)
        finally:
            self._stop()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            batch, stop = [first], False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            started = time.perf_counter()
            try:
                added = update_for_prompts(self.driver, batch, database=self.database, prompts_per_tx=self.max_batch)
                with self._lock:
                    self.added += added
                    self.batches += 1
            except Exception as exc:  # kept for drain(): the prompts stay un-aggregated, nothing is half-added
                with self._lock:
                    self._failed += batch
                    self._error = self._error or exc
            finally:
                self.seconds += time.perf_counter() - started
                for _ in range(len(batch) + stop):
                    self._queue.task_done()
            if stop:
                return


def set_pair_keys(tx: ManagedTransaction) -> None:
    """Key every existing AGG_EDGE by `pair` (the schema migration 2 -> 3; 3 -> 4 re-keys them)."""
    tx.run("MATCH (f:Feature)-[g:AGG_EDGE]->(t) SET g.pair = " + _PAIR).consume()


def hash_and_slim(tx: ManagedTransaction, chunk: int = 10_000) -> None:
    """The schema migration 3 -> 4: give every Feature and Token its `h`, re-key every AGG_EDGE by the integer
    `pair`, and drop the float sums the layer no longer stores (readers derive them, `AGG_VALUES`)."""
    for label in ("Feature", "Token"):
        keys = [r["key"] for r in tx.run(f"MATCH (n:{label}) WHERE n.h IS NULL RETURN n.key AS key")]
        for start in range(0, len(keys), chunk):
            rows = [[key, node_hash(key)] for key in keys[start : start + chunk]]
            tx.run(f"UNWIND $rows AS r MATCH (n:{label} {{key: r[0]}}) SET n.h = r[1]", rows=rows).consume()
    tx.run(
        "MATCH (f:Feature)-[g:AGG_EDGE]->(t) SET g.pair = " + _PAIR + " REMOVE g.sum_weight, g.sum_abs_weight, "
        "g.mean_weight"
    ).consume()


def rebuild_in_transaction(tx: ManagedTransaction) -> None:
    """Delete and recompute the whole layer in one transaction (the schema migration 1 -> 2; small stores)."""
    tx.run("MATCH ()-[g:AGG_EDGE]->() DELETE g").consume()
    tx.run(_FEATURES_ALL + " CALL (f) {" + _REBUILD_FROM_FEATURE + "}", scale=FIXED_POINT_SCALE).consume()
    tx.run("MATCH (p:Prompt) SET p.aggregated = true").consume()


def rebuild_aggregates(
    driver: Driver, database: str = "neo4j", *, transcoder: str | None = None, features_per_tx: int = 20
) -> RebuildResult:
    """Delete and recompute the aggregate layer from the stored prompt graphs, in batched transactions.

    `transcoder`: only the pairs whose source Feature belongs to it (others are left alone). Not atomic as a whole:
    readers may see a partly rebuilt layer while it runs; do not run it concurrently with writers. `features_per_tx`
    bounds transaction memory: 200 Zipf-popular features in one transaction exceeded the default memory pool of a
    2 GiB heap on a 5M-edge store.
    """
    started = time.perf_counter()
    features: LiteralString = _FEATURES_ALL if transcoder is None else _FEATURES_OF
    with driver.session(database=database) as session:
        session.run(
            features + " MATCH (f)-[g:AGG_EDGE]->() CALL (g) { DELETE g } IN TRANSACTIONS OF 10000 ROWS",
            transcoder=transcoder,
        ).consume()
        session.run(
            features + " CALL (f) {" + _REBUILD_FROM_FEATURE + "} IN TRANSACTIONS OF $batch ROWS",
            transcoder=transcoder,
            scale=FIXED_POINT_SCALE,
            batch=features_per_tx,
        ).consume()
        session.run(
            "MATCH (p:Prompt) WHERE $transcoder IS NULL OR p.transcoder = $transcoder "
            "CALL (p) { SET p.aggregated = true } IN TRANSACTIONS OF 10000 ROWS",
            transcoder=transcoder,
        ).consume()
        record = session.run(
            features + " MATCH (f)-[g:AGG_EDGE]->() RETURN count(g) AS n", transcoder=transcoder
        ).single()
    return RebuildResult(int(record["n"]) if record else 0, time.perf_counter() - started)


def aggregate_rows(driver: Driver, database: str = "neo4j", *, transcoder: str) -> list[AggregateRow]:
    """Every aggregate relationship whose source Feature belongs to `transcoder`, sorted by (source, target)."""
    records = driver.execute_query(
        "MATCH (f:Feature)-[g:AGG_EDGE]->(t) WHERE f.transcoder = $transcoder "
        "RETURN f.key AS s, t.key AS t, CASE WHEN t:Feature THEN 'feature' ELSE 'token' END AS kind, "
        + AGG_VALUES
        + " AS g ORDER BY s, t",
        transcoder=transcoder,
        database_=database,
    ).records
    return [
        AggregateRow(
            r["s"],
            r["t"],
            r["kind"],
            int(r["g"]["n_prompts"]),
            int(r["g"]["n_edges"]),
            float(r["g"]["sum_weight"]),
            float(r["g"]["sum_abs_weight"]),
            float(r["g"]["mean_weight"]),
            float(r["g"]["max_abs_weight"]),
            int(r["g"]["sum_weight_fx"]),
            int(r["g"]["sum_abs_weight_fx"]),
        )
        for r in records
    ]
