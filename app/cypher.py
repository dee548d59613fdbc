"""The Cypher console's runner: read-only by construction, bounded in time, rows and bytes.

Three independent layers keep a console query from changing the store or reading what it should not:
1. `check_read_only(text)` (pure, `app.cypher_guard`) tokenizes the query as Cypher does and refuses, before anything
   reaches the server, write and administration clauses (CREATE, INSERT, MERGE, …), more than one statement,
   `IN TRANSACTIONS`, `SHOW` other than INDEXES/CONSTRAINTS/FUNCTIONS/PROCEDURES, procedures and namespaced functions
   outside allow-lists (names compared after resolving back-quotes, comments and case), `\\uXXXX` escapes and the
   EXPLAIN/PROFILE/CYPHER prefixes.
2. `run_read_query` plans the query with `EXPLAIN` and refuses it unless the server classifies it as read-only
   (`summary.query_type == "r"`).
3. It then runs the query in an explicit transaction of a READ session, so the server itself rejects any write that
   slipped through.

Bounds (issue 17 §2):
- Time: the transaction carries a server-side timeout, and the call itself returns at `timeout_s + grace_s` whatever
  the server does: the query runs in a worker thread; at the deadline the runner terminates the transaction
  server-side (`TERMINATE TRANSACTIONS` through the app's own connection, found by a random metadata tag) and
  reports. Neo4j 5.26 does not check the termination flag inside a single expression (a `reduce` over 10^9 elements
  ran for 20-25 s in all whatever the timeout, a quadratic string `reduce` for over 9 minutes), so such a query may
  keep one server thread busy after the call has returned; a `ConsoleGate` holds its slot until the server lets go,
  so the console has at most `max_in_flight` queries on the server at any time and refuses more with a clear message.
- No driver retries: an explicit transaction, never `execute_read` (whose retries stretched one call to ~3x the
  timeout).
- Memory: the server's per-transaction limit (`db.memory.transaction.max`, set by the managed server) fails a query
  that collects too much; allocations Neo4j does not track end in a caught OutOfMemoryError (see
  `atlas.storage.neo4j_server.JVM_FLAGS`). Either way the query fails with a readable message and the server stays up.
- Bytes: records are fetched in small batches and measured as they are converted; the result stops at
  `max_bytes` (rows so far are kept, with a warning) and a single value above `max_value_bytes` fails the query. The
  driver receives one record whole before it can be measured, so one record is bounded by the server's memory
  limits, not by this module.

Results are turned into plain Python values (`to_plain`) for tables, and nodes/relationships/paths are collected into
a small graph (`ResultGraph`) that the page can draw. This module must not import Streamlit, and must not send the
user's text anywhere but to `EXPLAIN` and the READ transaction (the termination query is the app's own text).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from neo4j import READ_ACCESS, Driver, Query
from neo4j.exceptions import DriverError, Neo4jError
from neo4j.graph import Node, Path, Relationship

from app.cypher_guard import (
    READ_ONLY_PROCEDURES,
    WRITE_KEYWORDS,
    CypherRejected,
    check_read_only,
    strip_literals,
    tokenize,
)

__all__ = [
    "READ_ONLY_PROCEDURES",
    "WRITE_KEYWORDS",
    "ConsoleGate",
    "CypherError",
    "CypherRejected",
    "QueryResult",
    "ResultGraph",
    "check_read_only",
    "run_read_query",
    "strip_literals",
    "tokenize",
]

MB = 1024 * 1024
DEFAULT_MAX_BYTES = 32 * MB
DEFAULT_MAX_VALUE_BYTES = 8 * MB
DEFAULT_GRACE_S = 1.0
# Records per PULL: a small batch keeps what the driver buffers ahead of the byte count small.
FETCH_SIZE = 100
# The metadata key that tags the console's transactions, so the runner can find and terminate its own.
CONSOLE_TAG = "atlas_console"
# How long a timed-out call waits for the server to confirm the termination before it reports anyway.
TERMINATE_WAIT_S = 0.5


@dataclass
class ResultGraph:
    """Nodes and relationships found in a result, keyed by element id."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> {"labels", "properties"}
    relationships: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> {"type", "start", "end", ...}

    def add(self, value: Any) -> None:
        if isinstance(value, Node):
            self.nodes.setdefault(value.element_id, {"labels": sorted(value.labels), "properties": dict(value)})
        elif isinstance(value, Relationship):
            for end in (value.start_node, value.end_node):
                if end is not None:
                    self.add(end)
            self.relationships.setdefault(
                value.element_id,
                {
                    "type": value.type,
                    "start": value.start_node.element_id if value.start_node is not None else None,
                    "end": value.end_node.element_id if value.end_node is not None else None,
                    "properties": dict(value),
                },
            )
        elif isinstance(value, Path):
            for node in value.nodes:
                self.add(node)
            for rel in value.relationships:
                self.add(rel)
        elif isinstance(value, list):
            for item in value:
                self.add(item)
        elif isinstance(value, dict):
            for item in value.values():
                self.add(item)

    @property
    def has_relationships(self) -> bool:
        return bool(self.relationships)


def node_caption(labels: list[str], properties: dict[str, Any]) -> str:
    """A short name for a node: its most telling property, prefixed by its first label."""
    for key in ("node_id", "key", "id", "name", "text", "label"):
        if properties.get(key) is not None:
            return f"{labels[0] if labels else 'node'}:{properties[key]}"
    return labels[0] if labels else "node"


def to_plain(value: Any) -> Any:
    """A value fit for a table cell: nodes, relationships and paths become short strings; temporals ISO text."""
    if isinstance(value, Node):
        return node_caption(sorted(value.labels), dict(value))
    if isinstance(value, Relationship):
        weight = value.get("weight")
        suffix = f" {weight:+.4g}" if isinstance(weight, float) else ""
        return f"-[:{value.type}{suffix}]->"
    if isinstance(value, Path):
        parts = [to_plain(value.start_node)]
        for rel in value.relationships:
            parts += [to_plain(rel), to_plain(rel.end_node)]
        return " ".join(str(p) for p in parts)
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if hasattr(value, "iso_format"):
        return value.iso_format()
    return value


def approx_bytes(value: Any, cap: int | None = None) -> int:
    """A rough size of a result value as the app holds it: text and bytes by length, containers by their items
    (plus a small overhead each), graph entities by their properties. Cheap and monotone, not exact; with `cap`,
    it stops adding up a container once past the cap (the answer is then only known to exceed it)."""
    if isinstance(value, list | tuple):
        total = 16
        for item in value:
            total += approx_bytes(item, cap)
            if cap is not None and total > cap:
                break
        return total
    if value is None or isinstance(value, bool | int | float):
        return 8
    if isinstance(value, str | bytes | bytearray):
        return len(value) + 8
    if isinstance(value, Node):
        return 64 + approx_bytes(dict(value)) + sum(len(label) for label in value.labels)
    if isinstance(value, Relationship):
        return 64 + approx_bytes(dict(value)) + len(value.type)
    if isinstance(value, Path):
        return sum(approx_bytes(n) for n in value.nodes) + sum(approx_bytes(r) for r in value.relationships)
    if isinstance(value, dict):
        return 16 + sum(len(str(k)) + approx_bytes(v) for k, v in value.items())
    return 64  # temporal, spatial and other small values


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[dict[str, Any]]  # plain values (to_plain)
    truncated: bool  # more rows existed than the caps let through
    graph: ResultGraph
    seconds: float
    query: str
    truncated_reason: str = ""  # why the rows stop early (row cap or byte cap), for the page
    approx_bytes: int = 0


class CypherError(RuntimeError):
    """The server refused or failed the query, or it broke a console bound; the message is readable."""


class ConsoleGate:
    """At most `max_in_flight` console queries on the server at once, counting those the console stopped waiting
    for but the server is still evaluating. Thread-safe; one per app process (`DEFAULT_GATE`)."""

    def __init__(self, max_in_flight: int = 2) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def try_enter(self) -> bool:
        if not self._slots.acquire(blocking=False):
            return False
        with self._lock:
            self._in_flight += 1
        return True

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
        self._slots.release()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no console query is on the server (for tests and shutdown); True if idle in time."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


DEFAULT_GATE = ConsoleGate()

_MEMORY_CODES = ("MemoryPoolOutOfMemoryError", "TransactionOutOfMemoryError", "General.OutOfMemoryError")


def _readable(err: Neo4jError) -> str:
    message = (err.message or str(err)).strip()
    code = err.code or ""
    if any(c in code for c in _MEMORY_CODES) or "threshold reached" in message:
        return (
            "the query needed more server memory than a console query may use and was stopped; the server is still "
            f"up. Aggregate or LIMIT earlier instead of collecting large lists ({message})"
        )
    if "TransactionTimedOut" in code or "timed out" in message.lower():
        return f"the query ran past the server-side timeout and was stopped ({message})"
    if "Terminated" in code or "has been terminated" in message.lower():
        return f"the query was terminated on the server ({message})"
    if "AccessMode" in code or "not allowed in read access mode" in message.lower():
        return f"the server refused a write in the read-only console ({message})"
    return f"{code.rsplit('.', 1)[-1] or 'Neo4j error'}: {message}"


@dataclass(frozen=True)
class _Bounds:
    timeout_s: float
    row_cap: int
    max_bytes: int
    max_value_bytes: int


def _plan(session: Any, query: str, params: dict[str, Any], timeout_s: float) -> None:
    """EXPLAIN `query` (auto-commit, not retried) and refuse it unless the server says it only reads."""
    plan = session.run(Query(f"EXPLAIN {query}", timeout=timeout_s), params).consume()
    if plan.query_type not in ("r", None):
        kind = {"rw": "reads and writes", "w": "writes", "s": "changes the schema"}.get(plan.query_type, "")
        raise CypherRejected(f"the server reports that this query {kind or plan.query_type}; not run")


def _collect(result: Any, bounds: _Bounds) -> tuple[list[dict[str, Any]], ResultGraph, str, int]:
    """Rows (plain values), graph, why the rows stop early ('' if they do not) and approximate bytes."""
    rows: list[dict[str, Any]] = []
    graph = ResultGraph()
    total = 0
    for record in result:
        if len(rows) >= bounds.row_cap:
            return rows, graph, f"only the first {len(rows):,} rows are shown (row cap)", total
        values = dict(record.items())
        size = 0
        for key, value in values.items():
            one = approx_bytes(value, bounds.max_value_bytes)
            if one > bounds.max_value_bytes:
                raise CypherError(
                    f"the value of {key!r} in row {len(rows) + 1} exceeds {bounds.max_value_bytes / MB:g} MB, the "
                    "console's limit per value: return its size or a slice instead"
                )
            size += one
        if total + size > bounds.max_bytes:
            return (
                rows,
                graph,
                (f"the result exceeds {bounds.max_bytes / MB:g} MB: only the first {len(rows):,} rows are shown"),
                total,
            )
        total += size
        for value in values.values():
            graph.add(value)
        rows.append({k: to_plain(v) for k, v in values.items()})
    return rows, graph, "", total


def _execute(driver: Driver, database: str, query: str, params: dict[str, Any], bounds: _Bounds, tag: str) -> Any:
    """Plan and run `query` in one explicit READ transaction (no driver retries); returns keys and collected rows."""
    with driver.session(database=database, default_access_mode=READ_ACCESS, fetch_size=FETCH_SIZE) as session:
        _plan(session, query, params, bounds.timeout_s)
        tx = session.begin_transaction(timeout=bounds.timeout_s, metadata={CONSOLE_TAG: tag})
        try:
            result = tx.run(query, params)
            keys = list(result.keys())
            collected = _collect(result, bounds)
        finally:
            tx.close()  # rolls back: a read has nothing to commit, and it drops any rows left unread
    return keys, collected


def terminate_tagged(driver: Driver, database: str, tag: str, timeout_s: float = 5.0) -> list[str]:
    """Terminate the server transactions whose metadata carries this console `tag`; returns their ids.

    The text run here is the app's own, never the user's; on Community every user may terminate its own
    transactions, so the console's connection is enough where no admin connection is given."""
    show = Query(
        f"SHOW TRANSACTIONS YIELD transactionId, metaData WHERE metaData.{CONSOLE_TAG} = $tag RETURN transactionId",
        timeout=timeout_s,
    )
    with driver.session(database=database) as session:
        ids = [r["transactionId"] for r in session.run(show, tag=tag)]
        if ids:
            session.run(Query("TERMINATE TRANSACTIONS $ids", timeout=timeout_s), ids=ids).consume()
    return ids


def run_read_query(
    driver: Driver,
    text: str,
    *,
    database: str = "neo4j",
    parameters: dict[str, Any] | None = None,
    timeout_s: float = 15.0,
    row_cap: int = 1000,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    grace_s: float = DEFAULT_GRACE_S,
    admin_driver: Driver | None = None,
    gate: ConsoleGate | None = None,
) -> QueryResult:
    """Check, plan and run `text` read-only and return within `timeout_s + grace_s` (see the module docstring).

    Raises `CypherRejected` (refused before running), or `CypherError` (server error, a bound broken, or the
    deadline passed: then the transaction is terminated on the server through `admin_driver`, default `driver`).
    """
    query = check_read_only(text)
    bounds = _Bounds(timeout_s, row_cap, max_bytes, max_value_bytes)
    gate = gate if gate is not None else DEFAULT_GATE
    if not gate.try_enter():
        raise CypherError(
            f"{gate.max_in_flight} console queries are still running on the server (the console stopped waiting for "
            "them and asked the server to terminate them); try again in a little while"
        )
    tag = secrets.token_hex(8)
    outcome: dict[str, Any] = {}
    started = time.perf_counter()

    def work() -> None:
        try:
            outcome["value"] = _execute(driver, database, query, dict(parameters or {}), bounds, tag)
        except BaseException as err:  # handed to the caller's thread below
            outcome["error"] = err
        finally:
            gate.leave()

    worker = threading.Thread(target=work, name=f"cypher-console-{tag}", daemon=True)
    worker.start()
    worker.join(timeout_s + grace_s)
    if worker.is_alive():
        return _deadline_passed(admin_driver or driver, database, tag, timeout_s, time.perf_counter() - started)
    if "error" in outcome:
        err = outcome["error"]
        if isinstance(err, CypherRejected | CypherError):
            raise err
        if isinstance(err, Neo4jError):
            raise CypherError(_readable(err)) from err
        if isinstance(err, RecursionError):
            raise CypherError("the result nests lists or maps too deeply for the console to show") from err
        if isinstance(err, DriverError):
            raise CypherError(f"the connection to Neo4j failed during the query ({err})") from err
        raise err
    keys, (rows, graph, reason, size) = outcome["value"]
    seconds = time.perf_counter() - started
    return QueryResult(keys, rows, bool(reason), graph, seconds, query, reason, size)


def _deadline_passed(driver: Driver, database: str, tag: str, timeout_s: float, waited: float) -> QueryResult:
    """Ask the server to terminate the tagged transaction, in the background (a busy server may answer slowly, and
    the call must return now), and raise the timeout message."""
    outcome: dict[str, Any] = {}

    def terminate() -> None:
        try:
            outcome["ids"] = terminate_tagged(driver, database, tag)
        except (Neo4jError, DriverError) as err:
            outcome["error"] = err

    thread = threading.Thread(target=terminate, name=f"cypher-console-terminate-{tag}", daemon=True)
    thread.start()
    thread.join(TERMINATE_WAIT_S)
    if "ids" in outcome:
        ids = outcome["ids"]
        done = f"terminated it on the server ({', '.join(ids)})" if ids else "the server had already let it go"
    elif "error" in outcome:
        done = f"could not terminate it on the server ({outcome['error']})"
    else:
        done = "asked the server to terminate it"
    raise CypherError(
        f"the query ran past the {timeout_s:g} s timeout: the console stopped waiting after {waited:.1f} s and {done}. "
        "A single long expression (a reduce or list comprehension over a huge range) may keep the server busy a "
        "while longer; LIMIT earlier or bound the range"
    )
