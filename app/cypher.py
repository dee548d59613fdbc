"""The Cypher console's guard and runner: read-only by construction, bounded in time and rows.

Three independent layers keep a console query from changing the store:
1. `check_read_only(text)` (pure) rejects, before anything reaches the server, a query that contains a write or
   administration clause (CREATE, MERGE, DELETE, SET, REMOVE, DROP, LOAD CSV, FOREACH, ...), more than one
   statement, `CALL … IN TRANSACTIONS`, or a procedure outside a small read-only allow-list (so `CALL dbms.*`,
   `CALL db.create*` and APOC's write procedures are refused). Keywords inside string literals, comments and
   back-quoted names do not count.
2. `run_read_query` plans the query with `EXPLAIN` and refuses it unless the server classifies it as read-only
   (`summary.query_type == "r"`).
3. It then runs the query in a session opened with READ access mode (`execute_read`), so the server itself rejects
   any write that slipped through, with a transaction timeout enforced by the server and a cap on returned rows.

Results are turned into plain Python values (`to_plain`) for tables, and nodes/relationships/paths are collected into
a small graph (`ResultGraph`) that the page can draw. This module must not import Streamlit.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from neo4j import READ_ACCESS, Driver, Query, unit_of_work
from neo4j.exceptions import ClientError, Neo4jError
from neo4j.graph import Node, Path, Relationship

# Clauses and commands that write data or schema, or administer the server.
WRITE_KEYWORDS: tuple[str, ...] = (
    "CREATE",
    "MERGE",
    "DELETE",
    "DETACH",
    "SET",
    "REMOVE",
    "DROP",
    "FOREACH",
    "ALTER",
    "RENAME",
    "GRANT",
    "DENY",
    "REVOKE",
    "START",
    "STOP",
    "TERMINATE",
    "ENABLE",
    "DEALLOCATE",
    "REALLOCATE",
    "USE",
)
# Multi-word forms with their own message.
_LOAD_CSV = re.compile(r"\bLOAD\s+CSV\b", re.IGNORECASE)
_IN_TRANSACTIONS = re.compile(r"\bIN\s+(?:\d+\s+|\$\w+\s+)?(?:CONCURRENT\s+)?TRANSACTIONS\b", re.IGNORECASE)
_PERIODIC_COMMIT = re.compile(r"\bPERIODIC\s+COMMIT\b", re.IGNORECASE)
_KEYWORD = re.compile(r"(?<![.$:\w])(" + "|".join(WRITE_KEYWORDS) + r")(?![\w])(?!\s*:)", re.IGNORECASE)
# `CALL name.space.proc` (a procedure call; `CALL {` and `CALL (` are subqueries, checked like the rest).
_PROCEDURE = re.compile(r"\bCALL\s+([A-Za-z_][\w]*(?:\s*\.\s*[A-Za-z_][\w]*)*)", re.IGNORECASE)

# Procedures (lower-case, exact names or prefixes ending in ".") that only read.
READ_ONLY_PROCEDURES: tuple[str, ...] = (
    "db.labels",
    "db.relationshiptypes",
    "db.propertykeys",
    "db.schema.",
    "db.info",
    "db.ping",
    "db.indexes",
    "db.constraints",
    "apoc.meta.",
    "apoc.path.",
    "apoc.coll.",
    "apoc.text.",
    "apoc.map.",
    "apoc.math.",
    "apoc.agg.",
    "apoc.convert.",
    "apoc.date.",
    "apoc.algo.",
    "apoc.neighbors.",
    "apoc.nodes.get",
    "apoc.node.",
    "apoc.label.",
)


class CypherRejected(ValueError):
    """The console refused a query before running it; the message says why, for the user."""


def strip_literals(text: str) -> str:
    """`text` with comments removed and string literals and back-quoted names blanked (same length where kept).

    What remains is what the Cypher parser reads as keywords and identifiers.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "'\"`":
            j = i + 1
            while j < n and text[j] != ch:
                j += 2 if text[j] == "\\" and ch != "`" else 1
            out.append(" " * (min(j, n - 1) - i + 1))
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            out.append(" ")
            i = n if j < 0 else j + 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _procedure_allowed(name: str) -> bool:
    lowered = re.sub(r"\s+", "", name).lower()
    return any(lowered == p or (p.endswith(".") and lowered.startswith(p)) for p in READ_ONLY_PROCEDURES)


def check_read_only(text: str) -> str:
    """Return the query stripped of surrounding whitespace and a trailing `;`, or raise `CypherRejected`."""
    query = text.strip()
    while query.endswith(";"):
        query = query[:-1].rstrip()
    if not query:
        raise CypherRejected("the query is empty")
    code = strip_literals(query)
    if ";" in code:
        raise CypherRejected("only one statement at a time: remove the ';' between statements")
    if _LOAD_CSV.search(code):
        raise CypherRejected("LOAD CSV is not allowed: the console is read-only and reads only the graph store")
    if _IN_TRANSACTIONS.search(code) or _PERIODIC_COMMIT.search(code):
        raise CypherRejected("CALL { … } IN TRANSACTIONS is not allowed: the console runs one read transaction")
    for match in _PROCEDURE.finditer(code):
        name = re.sub(r"\s+", "", match.group(1))
        if name.lower().startswith("dbms."):
            raise CypherRejected(f"CALL {name} is not allowed: dbms procedures administer the server")
        if not _procedure_allowed(name):
            raise CypherRejected(
                f"CALL {name} is not allowed: the console only calls read-only procedures "
                f"({', '.join(p.rstrip('.') + ('.*' if p.endswith('.') else '') for p in READ_ONLY_PROCEDURES[:6])}, …)"
            )
    write = _KEYWORD.search(code)
    if write:
        keyword = write.group(1).upper()
        raise CypherRejected(
            f"{keyword} is not allowed: the console is read-only (no CREATE, MERGE, DELETE, SET, REMOVE, DROP, "
            "LOAD CSV or administration commands)"
        )
    return query


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


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[dict[str, Any]]  # plain values (to_plain)
    truncated: bool  # more rows existed than the cap
    graph: ResultGraph
    seconds: float
    query: str


class CypherError(RuntimeError):
    """The server refused or failed the query; the message is the server's, made readable."""


def _readable(err: Neo4jError) -> str:
    message = (err.message or str(err)).strip()
    code = err.code or ""
    if "TransactionTimedOut" in code or "timed out" in message.lower():
        return f"the query ran past the server-side timeout and was stopped ({message})"
    if "AccessMode" in code or "not allowed in read access mode" in message.lower():
        return f"the server refused a write in the read-only console ({message})"
    return f"{code.rsplit('.', 1)[-1] or 'Neo4j error'}: {message}"


def run_read_query(
    driver: Driver,
    text: str,
    *,
    database: str = "neo4j",
    parameters: dict[str, Any] | None = None,
    timeout_s: float = 15.0,
    row_cap: int = 1000,
) -> QueryResult:
    """Check, plan and run `text` read-only: EXPLAIN must say read-only; READ session; server timeout; row cap."""
    query = check_read_only(text)
    params = dict(parameters or {})
    started = time.perf_counter()
    try:
        with driver.session(database=database, default_access_mode=READ_ACCESS) as session:
            plan = session.run(Query(f"EXPLAIN {query}", timeout=timeout_s), params).consume()
            if plan.query_type not in ("r", None):
                kind = {"rw": "reads and writes", "w": "writes", "s": "changes the schema"}.get(plan.query_type, "")
                raise CypherRejected(f"the server reports that this query {kind or plan.query_type}; not run")

            def work(tx: Any) -> tuple[list[str], list[Any], bool]:
                result = tx.run(query, params)
                keys = list(result.keys())
                records: list[Any] = []
                truncated = False
                for record in result:
                    if len(records) >= row_cap:
                        truncated = True
                        break
                    records.append(record)
                result.consume()
                return keys, records, truncated

            keys, records, truncated = session.execute_read(unit_of_work(timeout=timeout_s)(work))
    except CypherRejected:
        raise
    except ClientError as err:
        raise CypherError(_readable(err)) from err
    except Neo4jError as err:
        raise CypherError(_readable(err)) from err
    graph = ResultGraph()
    rows = []
    for record in records:
        values = dict(record.items())
        for value in values.values():
            graph.add(value)
        rows.append({k: to_plain(v) for k, v in values.items()})
    return QueryResult(keys, rows, truncated, graph, time.perf_counter() - started, query)
