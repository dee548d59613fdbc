"""Bulk, idempotent, all-or-nothing loading of prompt attribution graphs into Neo4j (model: `graph_schema`).

`GraphWriter.write_prompt(meta, nodes, edges)` takes one prompt's Arrow tables (`NODE_SCHEMA` / `EDGE_SCHEMA` of
`atlas.attribution.graph`), validates them completely before touching the store (a `GraphValidationError` names the
missing or mistyped column, or the offending row), and writes the prompt in ONE managed write transaction made of
batched `UNWIND` statements of at most `batch_size` (10k) rows each:

1. Write-lock the `Prompt` (MERGE, then SET a constant), then MERGE `Model`, `Transcoder` and the Prompt
   (properties replaced), reading its `aggregated` flag only once the lock is held. The lock serialises concurrent
   writers of the same prompt, and with the background aggregator;
2. `DETACH DELETE` the prompt's previous instance nodes and so their edges (found through the composite
   `Instance(prompt_id, node_index)` constraint);
3. CREATE the instance nodes: input tokens and vocabulary logits in one statement that MERGEs their shared `:Token`
   (dynamic labels, Neo4j 5.26+), features in one that MERGEs their `:Feature`, then errors and custom-direction
   logits. Rows are sorted by the shared key they lock, Tokens before Features, so concurrent writers take shared
   locks in one global order and cannot deadlock on them;
4. CREATE the `:EDGE`s, sorted by (source, target). The statement collects the prompt's nodes once per batch, in
   `node_index` order, and resolves each edge's endpoints by rank in that list (no index seek per endpoint).

Numeric columns travel as one comma-separated string per column and are split on the server: the pure-Python Bolt
packer costs about 1 µs per list element (a 4k-edge prompt spent more time packing than the server spent executing),
a string costs nothing, and Python's float repr round-trips exactly through Cypher's `toFloat`. Each statement's
node and relationship counters are checked against the rows sent; a mismatch raises `GraphWriteError` and rolls the
prompt back.

Visibility ("never half-visible"): one transaction per prompt, because a transaction is atomic. Readers see the
previous complete version of a prompt or the new one, never a part (`neo4j` has read-committed isolation: nothing
uncommitted is visible, and readers take no locks, so they are not blocked either); a failure anywhere, including
the `after_batch` test hook raising, rolls back to the previous version with nothing to clean up, and no reader
needs a completeness filter. The alternative, a staged write (`Prompt {complete: false}`, batches committed one by
one, then a small flip transaction), was measured on the 2-core development machine at 64-80 ms per 4k-edge prompt
against 56-63 ms for one transaction, before counting the deferred delete of the replaced version and the garbage
collection of abandoned stages. Its only advantage is bounded transaction memory; one transaction of a 200k-edge,
22k-node prompt still commits with the default 1 GiB heap (5.3 s without aggregates, `benchmarks/neo4j_load.py`).

Measured (`benchmarks/neo4j_load.py`, fresh managed server, 1 GiB heap, 128 MiB page cache, after warm-up; 200
prompts of 674 nodes and 4,000 edges, client and server on the same 2 cores; 2026-12-02, final code):
- `write_prompts`, the default (graphs in one transaction per prompt, the aggregate layer added by the background
  aggregator, timed until every prompt is in): 43.6k EDGE relationships/s, 55.0k counting the IN and OF links,
  67.4k counting also the ~1,144 AGG_EDGEs a prompt creates (seven runs that day: 48.5k-56.3k, median 53.4k,
  counting IN and OF);
- aggregates inside each prompt's transaction (`write_prompt`, `write_prompts(pipelined=False)`: one ordered sweep
  over the ~1,550 Feature pairs of such a prompt, on the same server thread as the graph): 30.2k, 38.1k, 120 ms per
  prompt; pipelining gives 1.40-1.45x, as the server's second core runs the sweeps;
- without aggregate maintenance (`aggregates=False`): 52.1k, 65.7k, 65 ms per prompt;
- the one-statement-per-edge baseline: 457/s (whole prompts), so 95x with the default;
- re-ingesting existing prompts (delete, subtract, write, add in one transaction): 10.2k.
Every timed phase writes 200 new prompts into a store that already holds those of the earlier phases. The sweep is
mostly relationship upserts, found through the indexed integer `pair` key: with a MERGE instead, which scans the
AGG_EDGE chains of popular Features and Tokens, the per-prompt time grew from 143 to 210 ms between 200 and 900
stored prompts; keyed (by the string key of schema v3), it stayed flat. Computing the contributions on the client
and sending them as parameters was slower than reading the prompt's fresh edges back. A 200k-edge prompt does not
fit the transaction memory pool of a 1 GiB heap with in-transaction aggregates; pipelined (graph and aggregates in
two transactions) it takes 12.1 s.

Transient failures (`ServiceUnavailable`, `SessionExpired`, `TransientError` such as deadlocks) make the driver's
managed transaction (`Session.execute_write`) roll back and re-run the whole prompt with exponential back-off, up to
the driver's `max_transaction_retry_time`; the transaction function is deterministic, so a retry writes the same
graph.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, LiteralString

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from neo4j import Driver, ManagedTransaction
from neo4j.exceptions import ServiceUnavailable, SessionExpired

from atlas.attribution.graph import EDGE_SCHEMA, NODE_SCHEMA
from atlas.storage import aggregate, identities
from atlas.storage.graph_schema import SCHEMA_VERSION
from atlas.storage.migrations import ensure_schema

DEFAULT_BATCH_SIZE = 10_000

# Called after each batch statement, inside the prompt's transaction: (stage, rows in the batch). Raising from it
# aborts and rolls back the prompt (used by tests to simulate a failure part-way through a prompt).
BatchHook = Callable[[str, int], None]

# Properties of `prompt_meta` that the writer computes or checks itself.
_COMPUTED_META = frozenset({"n_nodes", "n_edges", "ingested_at", "schema_version", "aggregated"})
_REQUIRED_META = ("id", "model", "transcoder")
_NODE_KINDS = frozenset({"feature", "error", "token", "logit"})
_LIST_PARAMS = frozenset({"node_id", "key", "text", "label", "kind_label"})  # sent as lists; the rest as CSV
_STRING_TYPES = (pa.string(), pa.large_string(), *([pa.string_view()] if hasattr(pa, "string_view") else []))

# `node_index IS NOT NULL` lets the planner use the composite Instance(prompt_id, node_index) constraint's index for
# a prompt_id-only lookup; `{prompt_id: $pid}` alone would scan every :Instance node.
_PROMPT_NODES: LiteralString = "MATCH (n:Instance) WHERE n.prompt_id = $pid AND n.node_index IS NOT NULL"
_DELETE_PROMPT_NODES: LiteralString = _PROMPT_NODES + " DETACH DELETE n"

# Write-lock the Prompt (creating it if new) BEFORE anything reads its `aggregated` flag: an expression such as
# `SET p.x = coalesce(p.aggregated, ...)` reads the flag before it waits for the lock, so it may read the value from
# before a concurrent aggregator batch commits. A pipelined write that read "not aggregated" that way skipped the
# subtraction of a version the aggregator had just added, and the layer counted the prompt twice. (The flag is read
# through `properties(p)`: see `atlas.storage.aggregate` on the unknown-property-key notification.)
_LOCK_PROMPT: LiteralString = "MERGE (p:Prompt {id: $pid}) SET p.schema_version = $version"

_MERGE_PROMPT: LiteralString = """
MERGE (m:Model {name: $model})
MERGE (t:Transcoder {id: $transcoder}) ON CREATE SET t.model = $model
MERGE (t)-[:FOR]->(m)
MERGE (p:Prompt {id: $pid})
WITH p, coalesce(properties(p).aggregated, false) AS was_aggregated
SET p = $props
RETURN was_aggregated
"""

# Numeric columns travel as one comma-separated string each (`$i`, `$layer`, ...; empty = null) and are split on the
# server: the pure-Python Bolt packer spends about 1 µs per list element, a string costs next to nothing, and Python's
# float repr round-trips exactly through Cypher's toFloat. String columns (`$node_id`, `$key`, ...) stay lists.

# Input tokens and vocabulary logit targets in one statement, sorted by token key: every writer then locks the shared
# :Token nodes in one order (before the :Feature nodes, also sorted), so concurrent writers cannot deadlock on them.
# Rows are sorted so that an input token comes before a logit of the same token, and a new Token takes its text.
_CREATE_TOKEN_LINKED: LiteralString = """
MATCH (p:Prompt {id: $pid})
WITH p, split($i, ',') AS i, split($position, ',') AS position, split($token_id, ',') AS token_id,
     split($probability, ',') AS probability, split($logit, ',') AS logit, split($influence, ',') AS influence,
     split($h, ',') AS h
UNWIND range(0, $n - 1) AS k
MERGE (t:Token {key: $key[k]})
  ON CREATE SET t.model = $model, t.id = toInteger(token_id[k]), t.text = $text[k], t.h = toInteger(h[k])
CREATE (n:Instance:$($kind_label[k]) {prompt_id: $pid, node_index: toInteger(i[k]), node_id: $node_id[k],
        position: toInteger(position[k]), token_id: toInteger(token_id[k]), label: $label[k],
        probability: toFloat(probability[k]), logit: toFloat(logit[k]), influence: toFloat(influence[k])})
CREATE (n)-[:IN]->(p), (n)-[:OF]->(t)
"""

_CREATE_FEATURES: LiteralString = """
MATCH (p:Prompt {id: $pid})
WITH p, split($i, ',') AS i, split($layer, ',') AS layer, split($feature, ',') AS feature,
     split($position, ',') AS position, split($activation, ',') AS activation, split($influence, ',') AS influence,
     split($h, ',') AS h
UNWIND range(0, $n - 1) AS k
MERGE (f:Feature {key: $key[k]})
  ON CREATE SET f.transcoder = $transcoder, f.layer = toInteger(layer[k]), f.index = toInteger(feature[k]),
                f.h = toInteger(h[k])
CREATE (n:FeatureActivation:Instance {prompt_id: $pid, node_index: toInteger(i[k]), node_id: $node_id[k],
        layer: toInteger(layer[k]), position: toInteger(position[k]), activation: toFloat(activation[k]),
        influence: toFloat(influence[k])})
CREATE (n)-[:IN]->(p), (n)-[:OF]->(f)
"""

_CREATE_ERRORS: LiteralString = """
MATCH (p:Prompt {id: $pid})
WITH p, split($i, ',') AS i, split($layer, ',') AS layer, split($position, ',') AS position,
     split($norm, ',') AS norm, split($influence, ',') AS influence
UNWIND range(0, $n - 1) AS k
CREATE (n:ErrorNode:Instance {prompt_id: $pid, node_index: toInteger(i[k]), node_id: $node_id[k],
        layer: toInteger(layer[k]), position: toInteger(position[k]), norm: toFloat(norm[k]),
        influence: toFloat(influence[k])})
CREATE (n)-[:IN]->(p)
"""

_CREATE_DIRECTION_LOGITS: LiteralString = """
MATCH (p:Prompt {id: $pid})
WITH p, split($i, ',') AS i, split($position, ',') AS position, split($probability, ',') AS probability,
     split($logit, ',') AS logit, split($influence, ',') AS influence
UNWIND range(0, $n - 1) AS k
CREATE (n:LogitTarget:Instance {prompt_id: $pid, node_index: toInteger(i[k]), node_id: $node_id[k],
        position: toInteger(position[k]), label: $label[k], probability: toFloat(probability[k]),
        logit: toFloat(logit[k]), influence: toFloat(influence[k])})
CREATE (n)-[:IN]->(p)
"""

# `$s` / `$t` are ranks of node_index among the prompt's nodes, collected once per batch in node_index order; the
# size guard makes a rank mismatch create nothing, which the counter check turns into an error and a rollback.
_CREATE_EDGES: LiteralString = (
    _PROMPT_NODES
    + """
WITH n ORDER BY n.node_index
WITH collect(n) AS ns
WHERE size(ns) = $n_nodes
WITH ns, split($s, ',') AS s, split($t, ',') AS t, split($w, ',') AS w
UNWIND range(0, $n - 1) AS i
WITH ns[toInteger(s[i])] AS a, ns[toInteger(t[i])] AS b, toFloat(w[i]) AS weight
CREATE (a)-[:EDGE {weight: weight}]->(b)
"""
)

_DELETE_PROMPT: LiteralString = """
MATCH (p:Prompt {id: $pid})
DETACH DELETE p
"""


class GraphValidationError(ValueError):
    """The prompt metadata or Arrow tables do not match the storage contract; nothing was written."""


class GraphWriteError(RuntimeError):
    """The server did not create what a batch should have created; the prompt's transaction was rolled back."""


class StoreUnavailableError(ServiceUnavailable):
    """Neo4j could not be reached, even after the driver's retries; the prompt is whole or absent, never partial.

    A subclass of the driver's `ServiceUnavailable`, so existing handlers keep working.
    """


@contextlib.contextmanager
def _unavailable_as_error(what: str) -> Iterator[None]:
    try:
        yield
    except (ServiceUnavailable, SessionExpired) as exc:
        if isinstance(exc, StoreUnavailableError):
            raise
        raise StoreUnavailableError(
            f"{what}: Neo4j is unreachable ({exc}) after the driver's retries. A prompt is committed whole or not at "
            "all, and writing it again is safe (idempotent): rerun once the server answers (`atlas db status`)."
        ) from exc


@dataclass(frozen=True)
class WriteResult:
    prompt_id: str
    n_nodes: int
    n_edges: int
    replaced: bool  # an earlier version of the prompt was deleted in the same transaction
    seconds: float


@dataclass(frozen=True)
class StoreCounts:
    """What readers can see: complete prompts, their instance nodes and their attribution edges."""

    prompts: int
    instance_nodes: int
    edges: int


@dataclass(frozen=True)
class _Statement:
    stage: str
    query: LiteralString
    params: dict[str, Any]
    rows: int
    expect_nodes: int  # nodes the statement must create (-1: do not check)
    expect_rels: int  # relationships it must create (-1: do not check)


@dataclass(frozen=True)
class _PromptPlan:
    prompt_id: str
    statements: tuple[_Statement, ...]
    n_nodes: int
    n_edges: int


def _check_columns(table: pa.Table, schema: pa.Schema, what: str) -> None:
    if not isinstance(table, pa.Table):
        raise GraphValidationError(f"{what}: expected a pyarrow.Table, got {type(table).__name__}")
    for field in schema:
        if field.name not in table.column_names:
            raise GraphValidationError(f"{what}: missing column {field.name!r} (expected {field.type})")
        actual = table.schema.field(field.name).type
        ok = actual in _STRING_TYPES if field.type == pa.string() else actual == field.type
        if not ok:
            raise GraphValidationError(f"{what}: column {field.name!r} has type {actual}, expected {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise GraphValidationError(
                f"{what}: column {field.name!r} has {table.column(field.name).null_count} null value(s)"
            )


def _csv(values: list[Any]) -> str:
    """Numbers as one comma-separated string (None -> empty, which Cypher's toInteger/toFloat read as null)."""
    if None in values:
        return ",".join("" if v is None else repr(v) for v in values)
    return ",".join(map(repr, values))


def _require(table: pa.Table, columns: Sequence[str], kind: str) -> None:
    """Columns that must be non-null for nodes of `kind`."""
    for name in columns:
        nulls = table.column(name).is_null()
        if pc.any(nulls).as_py():
            index = table.filter(nulls).column("node_index")[0]
            raise GraphValidationError(f"nodes: {kind} node {index} has no {name!r} (required for {kind} nodes)")


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _storable(key: str, value: Any) -> None:
    """Reject values Neo4j cannot store as a property (maps, nested or mixed lists)."""
    scalar = (str, int, float, bool, datetime)
    if value is None or isinstance(value, scalar):
        return
    if (
        isinstance(value, list | tuple)
        and all(isinstance(v, scalar) for v in value)
        and len({type(v) for v in value}) <= 1
    ):
        return
    raise GraphValidationError(f"prompt_meta[{key!r}] = {value!r:.80} is not storable as a Neo4j property")


class GraphWriter:
    """Writes prompt graphs into Neo4j; see the module docstring for the transaction design.

    `batch_size` caps the rows of one `UNWIND` statement (nodes and edges); `after_batch` is a test hook called
    after every statement inside the prompt's transaction. `aggregates` (default on) maintains the aggregate layer
    (`atlas.storage.aggregate`) inside each prompt's transaction; switch it off only for a bulk load that is
    followed by `aggregate.rebuild_aggregates`, or the layer no longer matches the prompts.
    """

    def __init__(
        self,
        driver: Driver,
        database: str = "neo4j",
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        after_batch: BatchHook | None = None,
        aggregates: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.driver = driver
        self.database = database
        self.batch_size = batch_size
        self.after_batch = after_batch
        self.aggregates = aggregates
        self._schema_ready = False

    # -- schema --------------------------------------------------------------------------------------------------

    def ensure_schema(self) -> int:
        """Create constraints/indexes and check the schema version (once per writer); return the version."""
        with _unavailable_as_error("the schema could not be checked"):
            version = ensure_schema(self.driver, self.database)
        self._schema_ready = True
        return version

    def register_transcoder(
        self,
        transcoder_id: str,
        *,
        model: str,
        name: str,
        source: str,
        kind: str,
        config: Mapping[str, Any],
        card: Mapping[str, Any] | None = None,
    ) -> None:
        """MERGE the dictionary's Transcoder (keyed by its weights), add `name`/`source` to its labels, and set its
        card's figures as properties."""
        if not self._schema_ready:
            self.ensure_schema()
        with (
            _unavailable_as_error(f"transcoder {transcoder_id!r} was not registered"),
            self.driver.session(database=self.database) as session,
        ):
            session.execute_write(identities.register_transcoder, transcoder_id, model=model, name=name,
                                  source=source, kind=kind, config=config, card=card)  # fmt: skip

    def register_model(self, key: str, *, name: str, source: str, weights: str | None) -> None:
        """MERGE the Model `key` and record the name it was loaded by, its source kind and its weights digest."""
        if not self._schema_ready:
            self.ensure_schema()
        with (
            _unavailable_as_error(f"model {key!r} was not registered"),
            self.driver.session(database=self.database) as session,
        ):
            session.execute_write(identities.register_model, key, name=name, source=source, weights=weights)

    # -- writing -------------------------------------------------------------------------------------------------

    def write_prompt(
        self,
        prompt_meta: Mapping[str, Any],
        nodes: pa.Table,
        edges: pa.Table,
        *,
        aggregator: aggregate.BackgroundAggregator | None = None,
    ) -> WriteResult:
        """Replace prompt `prompt_meta["id"]` by this graph, atomically; validation errors touch nothing.

        With `aggregates` on, the prompt's transaction adds it to the aggregate layer too, unless an `aggregator` is
        given: the transaction then writes the graph alone and hands the committed prompt to the aggregator, which
        adds it in the background. (A prompt that replaces an aggregated version is still swapped in the layer
        inside its transaction; the aggregator then finds it aggregated and skips it.)
        """
        plan = self.plan_prompt(prompt_meta, nodes, edges)
        if not self._schema_ready:
            self.ensure_schema()
        add_in_transaction = self.aggregates and aggregator is None
        started = time.perf_counter()
        with (
            _unavailable_as_error(f"prompt {plan.prompt_id!r} was not written"),
            self.driver.session(database=self.database) as session,
        ):
            replaced = session.execute_write(self._run_plan, plan, add_in_transaction)
        result = WriteResult(plan.prompt_id, plan.n_nodes, plan.n_edges, replaced, time.perf_counter() - started)
        if self.aggregates and aggregator is not None:
            aggregator.submit(plan.prompt_id)
        return result

    def write_prompts(
        self,
        graphs: Iterable[tuple[Mapping[str, Any], pa.Table, pa.Table]],
        *,
        workers: int = 1,
        pipelined: bool = True,
    ) -> list[WriteResult]:
        """`write_prompt` for each `(meta, nodes, edges)`, on `workers` threads (one transaction per prompt).

        Results come in input order. Each prompt stays atomic; after a failure no further prompt is started, and the
        first failure (in input order) is raised once the prompts in flight have finished (those committed stay).

        `pipelined` (with `aggregates` on): a `BackgroundAggregator` adds the committed prompts to the aggregate
        layer on a second server thread, in batches, while the next graphs are written, and this returns once every
        written prompt is aggregated. Measured on 2 cores it writes 1.4x more relationships per second than
        maintaining the layer inside each prompt's transaction (`pipelined=False`), which keeps one server core
        busy; the layer then lags the prompts in flight, and matches exactly the prompts flagged `aggregated`.
        More `workers` overlap the client's preparation and round trips with the server's work; with client and
        server on the same 2 cores they measured no gain, as the server is then the bottleneck, and graph writers
        that share popular Features contend for their locks (with the aggregator too).
        """
        if workers < 1:
            raise ValueError("workers must be positive")
        if not self._schema_ready:
            self.ensure_schema()
        if not (pipelined and self.aggregates):
            return self._write_all(graphs, workers, None)
        with aggregate.BackgroundAggregator(self.driver, database=self.database) as aggregator:
            return self._write_all(graphs, workers, aggregator)

    def _write_all(
        self,
        graphs: Iterable[tuple[Mapping[str, Any], pa.Table, pa.Table]],
        workers: int,
        aggregator: aggregate.BackgroundAggregator | None,
    ) -> list[WriteResult]:
        if workers == 1:
            return [self.write_prompt(meta, nodes, edges, aggregator=aggregator) for meta, nodes, edges in graphs]
        ordered: list[Future[WriteResult]] = []
        with ThreadPoolExecutor(workers, thread_name_prefix="atlas-graph-writer") as pool:
            pending: set[Future[WriteResult]] = set()
            for meta, nodes, edges in graphs:
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    if any(future.exception() is not None for future in done):
                        break
                future = pool.submit(self.write_prompt, meta, nodes, edges, aggregator=aggregator)
                ordered.append(future)
                pending.add(future)
            wait(pending)
        return [future.result() for future in ordered]  # in input order; raises the first failure

    def _run_plan(self, tx: ManagedTransaction, plan: _PromptPlan, add_aggregates: bool) -> bool:
        deleted = 0
        was_aggregated = False
        old: aggregate.Contributions | None = None
        if add_aggregates:
            aggregate.lock_aggregates(tx)  # first: aggregate-maintaining transactions run one at a time
        tx.run(_LOCK_PROMPT, pid=plan.prompt_id, version=SCHEMA_VERSION).consume()
        for position, st in enumerate(plan.statements):
            result = tx.run(st.query, st.params)
            if position == 0:
                record = result.single()
                was_aggregated = bool(record and record["was_aggregated"])
            counters = result.consume().counters
            if (st.expect_nodes >= 0 and counters.nodes_created != st.expect_nodes) or (
                st.expect_rels >= 0 and counters.relationships_created != st.expect_rels
            ):
                raise GraphWriteError(
                    f"prompt {plan.prompt_id!r}, {st.stage}: created {counters.nodes_created} nodes and "
                    f"{counters.relationships_created} relationships, expected {st.expect_nodes} and "
                    f"{st.expect_rels}; rolled back"
                )
            if position == 0:
                # The Prompt MERGE + SET comes first: its write lock serialises concurrent writers of the same
                # prompt, so this delete sees (and removes) whatever a previous writer committed. The old version's
                # aggregate contributions (if it had been aggregated) are read from its edges first; they are
                # subtracted at the end, in the same ordered sweep that adds the new ones.
                if was_aggregated:
                    if not add_aggregates:
                        aggregate.lock_aggregates(tx)
                        # Replacing an aggregated version: subtract it and add the new one in this transaction's
                        # sweep (as in-transaction maintenance does), so the layer never counts both versions or
                        # neither. A subtraction alone would also find the old version's maxima stale for many pairs
                        # and recompute them over every edge of popular pairs, which took minutes.
                        add_aggregates = self.aggregates
                    old = aggregate.read_contributions(tx, plan.prompt_id)
                deleted = tx.run(_DELETE_PROMPT_NODES, pid=plan.prompt_id).consume().counters.nodes_deleted
            if self.after_batch is not None:
                self.after_batch(st.stage, st.rows)
        if add_aggregates or old is not None:
            aggregate.apply_prompt(tx, plan.prompt_id, add=add_aggregates, old=old)  # add marks it `aggregated`
            if self.after_batch is not None:
                self.after_batch("aggregates", plan.n_edges)
        return deleted > 0

    def plan_prompt(self, prompt_meta: Mapping[str, Any], nodes: pa.Table, edges: pa.Table) -> _PromptPlan:
        """Validate the inputs and turn them into the prompt's batch statements (no database access)."""
        meta = self._validate_meta(prompt_meta)
        pid: str = meta["id"]
        model: str = meta["model"]
        transcoder: str = meta["transcoder"]
        _check_columns(nodes, NODE_SCHEMA, "nodes")
        _check_columns(edges, EDGE_SCHEMA, "edges")
        if nodes.num_rows == 0:
            raise GraphValidationError("nodes: the table is empty")
        nodes = nodes.select(NODE_SCHEMA.names).combine_chunks()
        edges = edges.select(EDGE_SCHEMA.names).combine_chunks()
        for what, table in (("nodes", nodes), ("edges", edges)):
            if table.num_rows and not pc.all(pc.equal(table.column("prompt_id"), pid)).as_py():
                raise GraphValidationError(f"{what}: column 'prompt_id' holds values other than {pid!r}")

        node_index = nodes.column("node_index").to_numpy()
        sorted_index = np.sort(node_index)
        duplicate = sorted_index[1:] == sorted_index[:-1]
        if bool(duplicate.any()):
            raise GraphValidationError(f"nodes: node_index {int(sorted_index[1:][duplicate][0])} occurs more than once")
        kind = nodes.column("kind")
        known = pc.is_in(kind, value_set=pa.array(sorted(_NODE_KINDS)))
        if not pc.all(known).as_py():
            bad = nodes.filter(pc.invert(known))
            raise GraphValidationError(
                f"nodes: node {bad.column('node_index')[0]} has kind {bad.column('kind')[0].as_py()!r}, expected one "
                f"of {', '.join(sorted(_NODE_KINDS))}"
            )

        features = nodes.filter(pc.equal(kind, "feature"))
        _require(features, ("feature_key", "layer", "feature"), "feature")
        expected_key = pc.binary_join_element_wise(
            pa.scalar(transcoder),
            pc.cast(features.column("layer"), pa.string()),
            pc.cast(features.column("feature"), pa.string()),
            "/",
        )
        mismatch = pc.invert(pc.equal(pc.cast(features.column("feature_key"), pa.string()), expected_key))
        if pc.any(mismatch).as_py():
            bad = features.filter(mismatch)
            raise GraphValidationError(
                f"nodes: feature node {bad.column('node_index')[0]} has feature_key "
                f"{bad.column('feature_key')[0].as_py()!r}, but its transcoder/layer/feature give "
                f"{pc.filter(expected_key, mismatch)[0].as_py()!r} (prompt_meta transcoder {transcoder!r})"
            )
        features = features.take(pc.sort_indices(features, sort_keys=[("feature_key", "ascending")]))

        errors = nodes.filter(pc.equal(kind, "error"))
        _require(errors, ("layer",), "error")
        input_tokens = nodes.filter(pc.equal(kind, "token"))
        _require(input_tokens, ("token_id",), "token")
        logits = nodes.filter(pc.equal(kind, "logit"))
        direction_logits = logits.filter(pc.is_null(logits.column("token_id")))
        token_linked = pa.concat_tables([input_tokens, logits.filter(pc.is_valid(logits.column("token_id")))])
        token_keys = pc.binary_join_element_wise(
            pa.scalar(model), pc.cast(token_linked.column("token_id"), pa.string()), "/"
        )
        token_linked = token_linked.append_column("key", token_keys)
        # "token" sorts after "logit": descending kind puts an input token before a logit of the same token.
        token_linked = token_linked.take(
            pc.sort_indices(token_linked, sort_keys=[("key", "ascending"), ("kind", "descending")])
        )
        is_logit = pc.equal(token_linked.column("kind"), "logit")
        token_keys_sorted = token_linked.column("key").to_pylist()
        null_str = pa.scalar(None, pa.string())
        null_f32 = pa.scalar(None, pa.float32())

        def cols(table: pa.Table, **columns: str | pa.Array | pa.ChunkedArray) -> dict[str, list[Any]]:
            base = {"i": "node_index", "node_id": "node_id", "position": "position", "influence": "influence"}
            out: dict[str, list[Any]] = {}
            for name, source in {**base, **columns}.items():
                column = table.column(source) if isinstance(source, str) else source
                out[name] = column.to_pylist()
            return out

        statements: list[_Statement] = []
        props = dict(meta)
        n_nodes, n_edges = nodes.num_rows, edges.num_rows
        props.update(n_nodes=n_nodes, n_edges=n_edges, schema_version=SCHEMA_VERSION, ingested_at=datetime.now(UTC))
        props.setdefault("created_at", props["ingested_at"])
        prompt_params = {"pid": pid, "model": model, "transcoder": transcoder, "props": props}
        statements.append(_Statement("prompt", _MERGE_PROMPT, prompt_params, 1, -1, -1))
        shared = {"pid": pid, "model": model, "transcoder": transcoder}
        statements += self._batches(
            "token_nodes",
            _CREATE_TOKEN_LINKED,
            shared,
            cols(
                token_linked,
                key="key",
                token_id="token_id",
                text="token",
                h=pa.array([aggregate.node_hash(k) for k in token_keys_sorted], pa.int64()),
                kind_label=pc.if_else(is_logit, "LogitTarget", "InputToken"),
                label=pc.if_else(is_logit, token_linked.column("token"), null_str),
                probability=pc.if_else(is_logit, token_linked.column("probability"), null_f32),
                logit=pc.if_else(is_logit, token_linked.column("activation"), null_f32),
            ),
            rels_per_row=2,
            exact_nodes=False,  # may also create the shared :Token
        )
        statements += self._batches(
            "feature_nodes",
            _CREATE_FEATURES,
            shared,
            cols(
                features,
                key="feature_key",
                layer="layer",
                feature="feature",
                activation="activation",
                h=pa.array([aggregate.node_hash(k) for k in features.column("feature_key").to_pylist()], pa.int64()),
            ),
            rels_per_row=2,
            exact_nodes=False,  # may also create the shared :Feature
        )
        statements += self._batches(
            "error_nodes", _CREATE_ERRORS, shared, cols(errors, layer="layer", norm="activation"), rels_per_row=1
        )
        statements += self._batches(
            "direction_logit_nodes",
            _CREATE_DIRECTION_LOGITS,
            shared,
            cols(direction_logits, label="token", probability="probability", logit="activation"),
            rels_per_row=1,
        )

        source = edges.column("source").to_numpy()
        target = edges.column("target").to_numpy()
        weight = edges.column("weight").to_numpy().astype(np.float64)
        s_rank = np.searchsorted(sorted_index, source)
        t_rank = np.searchsorted(sorted_index, target)
        for name, values, rank in (("source", source, s_rank), ("target", target, t_rank)):
            missing = sorted_index[np.minimum(rank, len(sorted_index) - 1)] != values
            if bool(missing.any()):
                raise GraphValidationError(
                    f"edges: {name} {int(values[missing][0])} is not a node_index of the node table "
                    f"({int(missing.sum())} edge(s) affected)"
                )
        if not bool(np.isfinite(weight).all()):
            raise GraphValidationError(f"edges: {int((~np.isfinite(weight)).sum())} weight(s) are NaN or infinite")
        edge_order = np.lexsort((t_rank, s_rank))
        edge_cols = {
            "s": s_rank[edge_order].tolist(),
            "t": t_rank[edge_order].tolist(),
            "w": weight[edge_order].tolist(),
        }
        statements += self._batches(
            "edges", _CREATE_EDGES, {"pid": pid, "n_nodes": n_nodes}, edge_cols, rels_per_row=1, exact_nodes=True,
            nodes_per_row=0,
        )  # fmt: skip
        return _PromptPlan(pid, tuple(statements), n_nodes, n_edges)

    def _batches(
        self,
        stage: str,
        query: LiteralString,
        shared: Mapping[str, Any],
        columns: Mapping[str, list[Any]],
        *,
        rels_per_row: int,
        exact_nodes: bool = True,
        nodes_per_row: int = 1,
    ) -> list[_Statement]:
        """One statement per `batch_size` rows of `columns` (parallel lists), with its expected counters.

        String columns (`_LIST_PARAMS`) are sent as lists, numeric ones as comma-separated strings (see above).
        """
        n = len(next(iter(columns.values()))) if columns else 0
        out = []
        for start, stop in _chunks(n, self.batch_size):
            rows = stop - start
            params: dict[str, Any] = {**shared, "n": rows}
            for name, values in columns.items():
                part = values[start:stop]
                params[name] = part if name in _LIST_PARAMS else _csv(part)
            expect_nodes = rows * nodes_per_row if exact_nodes else -1
            out.append(_Statement(stage, query, params, rows, expect_nodes, rows * rels_per_row))
        return out

    @staticmethod
    def _validate_meta(prompt_meta: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(prompt_meta, Mapping):
            raise GraphValidationError(f"prompt_meta: expected a mapping, got {type(prompt_meta).__name__}")
        for key in _REQUIRED_META:
            value = prompt_meta.get(key)
            if not isinstance(value, str) or not value:
                raise GraphValidationError(f"prompt_meta: {key!r} must be a non-empty string, got {value!r}")
        meta: dict[str, Any] = {}
        for key, value in prompt_meta.items():
            if not isinstance(key, str):
                raise GraphValidationError(f"prompt_meta: keys must be strings, got {key!r}")
            if key in _COMPUTED_META:
                continue  # computed from the tables by the writer
            if isinstance(value, float) and math.isnan(value):
                value = None
            _storable(key, value)
            if value is not None:
                meta[key] = list(value) if isinstance(value, tuple) else value
        return meta

    # -- deleting and reading ------------------------------------------------------------------------------------

    def delete_prompt(self, prompt_id: str) -> bool:
        """Delete a prompt, its instance nodes and edges in one transaction; True if it existed."""
        if not self._schema_ready:
            self.ensure_schema()

        def work(tx: ManagedTransaction) -> bool:
            old = aggregate.contributions_before_delete(tx, prompt_id)
            nodes = tx.run(_DELETE_PROMPT_NODES, pid=prompt_id).consume().counters.nodes_deleted
            aggregate.apply_prompt(tx, prompt_id, add=False, old=old)
            prompts = tx.run(_DELETE_PROMPT, pid=prompt_id).consume().counters.nodes_deleted
            return nodes + prompts > 0

        with (
            _unavailable_as_error(f"prompt {prompt_id!r} was not deleted"),
            self.driver.session(database=self.database) as session,
        ):
            return session.execute_write(work)

    def set_feature_labels(self, labels: Mapping[str, str]) -> int:
        """Set machine-made labels (`auto_label`, e.g. auto-interpretation names) on existing Features by key; the
        shown `label` follows unless a user label is set (`atlas.storage.labels`). Returns how many were found."""
        if not self._schema_ready:
            self.ensure_schema()
        bad = [k for k, v in labels.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise GraphValidationError(f"feature labels must map key strings to label strings, got {bad[0]!r}")
        rows = [{"key": k, "label": v} for k, v in sorted(labels.items())]
        records = self.driver.execute_query(
            "UNWIND $rows AS row MATCH (f:Feature {key: row.key}) "
            "SET f.auto_label = row.label, f.label = coalesce(f.user_label, row.label) RETURN count(f) AS n",
            rows=rows,
            database_=self.database,
        ).records
        return int(records[0]["n"])

    def prompt_exists(self, prompt_id: str) -> bool:
        records = self.driver.execute_query(
            "MATCH (p:Prompt {id: $pid}) RETURN count(p) AS n", pid=prompt_id, database_=self.database
        ).records
        return bool(records[0]["n"])

    def store_counts(self) -> StoreCounts:
        """Prompts, instance nodes and attribution edges in the store (all committed prompts are complete)."""
        record = self.driver.execute_query(
            """
            CALL () { MATCH (p:Prompt) RETURN count(p) AS prompts }
            CALL () { MATCH (n:Instance) RETURN count(n) AS instance_nodes }
            CALL () { MATCH ()-[e:EDGE]->() RETURN count(e) AS edges }
            RETURN prompts, instance_nodes, edges
            """,
            database_=self.database,
        ).records[0]
        return StoreCounts(int(record["prompts"]), int(record["instance_nodes"]), int(record["edges"]))
