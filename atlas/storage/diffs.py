"""Diff results in the stores: a `(:Diff)` node, `ALIGNS_WITH` relationships and four DuckDB tables, all or nothing.

Neo4j (an additive extension of `atlas.storage.graph_schema`, no schema version change; constraint
`atlas_diff_id` on `Diff(id)`):

    (:Diff {id, created_at, a, b, classification, matched_fraction, r2, n_prompts, mean_similarity, noise_quantile,
            noise_dissimilarity, noise_reference, n_exceeding, max_divergence_layer})
        -[:A]->(:Transcoder)  -[:B]->(:Transcoder)
        -[:ON {similarity, node_overlap, edge_overlap, adjacency_similarity, spectral_similarity,
               noise_dissimilarity, exceeds_noise, max_divergence_layer, prompt_b, cluster}]->(:Prompt)
                                                             A's prompt of each shared text
    (:Feature)-[:ALIGNS_WITH {diff, decoder_cos, encoder_cos, act_corr, score, method}]->(:Feature)
                                                             A's feature to B's; only for features the store holds
                                                             (a feature exists once some prompt activated it)

DuckDB (`diffs.duckdb`, next to the feature statistics): `diffs` (one row per Diff), `diff_alignments` (every
aligned pair, stored features or not), `diff_prompts` (per shared prompt) and `diff_changes` (the nodes and edges
only in A, only in B, or changed, per prompt).

Atomicity as in `atlas.storage.validations`: DuckDB rows inside an open DuckDB transaction, the Neo4j part in one
transaction that first checks both Transcoders and every prompt exist (raising `DiffStoreError` naming the missing
ones, nothing written); DuckDB commits only after Neo4j did, and a failed DuckDB commit deletes the Neo4j part
again. This module runs no model and computes no diff.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
from neo4j import Driver, ManagedTransaction

DIFF = "Diff"
REL_ALIGNS_WITH = "ALIGNS_WITH"

_DIFF_COLUMNS: dict[str, str] = {
    "id": "VARCHAR PRIMARY KEY", "created_at": "VARCHAR", "a": "VARCHAR", "b": "VARCHAR",
    "classification": "VARCHAR", "matched_fraction": "DOUBLE", "r2": "DOUBLE", "n_prompts": "INTEGER",
    "mean_similarity": "DOUBLE", "noise_quantile": "DOUBLE", "noise_dissimilarity": "DOUBLE",
    "noise_reference": "VARCHAR", "n_exceeding": "INTEGER", "max_divergence_layer": "VARCHAR",
}  # fmt: skip
_ALIGN_COLUMNS: dict[str, str] = {
    "diff_id": "VARCHAR", "layer": "INTEGER", "key_a": "VARCHAR", "key_b": "VARCHAR", "decoder_cos": "DOUBLE",
    "encoder_cos": "DOUBLE", "act_corr": "DOUBLE", "score": "DOUBLE", "method": "VARCHAR",
}  # fmt: skip
_PROMPT_COLUMNS: dict[str, str] = {
    "diff_id": "VARCHAR", "text": "VARCHAR", "prompt_a": "VARCHAR", "prompt_b": "VARCHAR", "similarity": "DOUBLE",
    "node_overlap": "DOUBLE", "edge_overlap": "DOUBLE", "adjacency_similarity": "DOUBLE",
    "spectral_similarity": "DOUBLE", "noise_dissimilarity": "DOUBLE", "exceeds_noise": "BOOLEAN",
    "max_divergence_layer": "VARCHAR", "cluster": "VARCHAR",
}  # fmt: skip
_CHANGE_COLUMNS: dict[str, str] = {
    "diff_id": "VARCHAR", "prompt_a": "VARCHAR", "element": "VARCHAR", "status": "VARCHAR", "key": "VARCHAR",
    "layer": "VARCHAR", "weight_a": "DOUBLE", "weight_b": "DOUBLE", "exceeds_noise": "BOOLEAN",
}  # fmt: skip
TABLES = {"diffs": _DIFF_COLUMNS, "diff_alignments": _ALIGN_COLUMNS, "diff_prompts": _PROMPT_COLUMNS,
          "diff_changes": _CHANGE_COLUMNS}  # fmt: skip


class DiffStoreError(ValueError):
    """A diff that cannot be stored (unknown transcoder or prompt, nothing to store): nothing was written."""


@dataclass
class DiffRecord:
    """One diff, ready to store: `properties` keyed as `_DIFF_COLUMNS` (id and created_at filled in here), rows of
    the other tables as dicts keyed by their columns (without `diff_id`)."""

    a: str
    b: str
    properties: dict[str, Any]
    alignments: list[dict[str, Any]]
    prompts: list[dict[str, Any]]
    changes: list[dict[str, Any]]
    id: str = field(default_factory=lambda: f"diff-{uuid.uuid4().hex[:12]}")

    def __post_init__(self) -> None:
        self.properties = {**self.properties, "id": self.id, "a": self.a, "b": self.b}
        self.properties.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _create_tables(con: duckdb.DuckDBPyConnection) -> None:
    for name, columns in TABLES.items():
        con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(f'{c} {t}' for c, t in columns.items())})")


def ensure_diff_schema(driver: Driver, database: str = "neo4j") -> None:
    driver.execute_query(f"CREATE CONSTRAINT atlas_diff_id IF NOT EXISTS FOR (d:{DIFF}) REQUIRE d.id IS UNIQUE",
                         database_=database)  # fmt: skip


def _write_neo4j(tx: ManagedTransaction, record: DiffRecord) -> int:
    found = {r["id"] for r in tx.run("MATCH (t:Transcoder) WHERE t.id IN $ids RETURN t.id AS id",
                                     ids=[record.a, record.b])}  # fmt: skip
    missing = [t for t in (record.a, record.b) if t not in found]
    if missing:
        raise DiffStoreError(f"transcoder(s) not in the store: {', '.join(missing)}")
    pids = [p["prompt_a"] for p in record.prompts]
    stored = {r["id"] for r in tx.run("MATCH (p:Prompt) WHERE p.id IN $ids RETURN p.id AS id", ids=pids)}
    if missing := sorted(set(pids) - stored):
        raise DiffStoreError(f"prompt(s) not in the store: {', '.join(missing[:5])}")
    props = {k: _clean(v) for k, v in record.properties.items() if _clean(v) is not None}
    tx.run(
        "MATCH (ta:Transcoder {id: $a}), (tb:Transcoder {id: $b}) CREATE (d:Diff) SET d = $props "
        "CREATE (d)-[:A]->(ta) CREATE (d)-[:B]->(tb)",
        a=record.a, b=record.b, props=props,
    ).consume()  # fmt: skip
    on = [{"pid": p["prompt_a"], "props": {k: _clean(p[k]) for k in ("similarity", "node_overlap", "edge_overlap",
           "adjacency_similarity", "spectral_similarity", "noise_dissimilarity", "exceeds_noise",
           "max_divergence_layer", "prompt_b", "cluster")
           if _clean(p.get(k)) is not None}} for p in record.prompts]  # fmt: skip
    tx.run("MATCH (d:Diff {id: $id}) UNWIND $rows AS row MATCH (p:Prompt {id: row.pid}) "
           "CREATE (d)-[o:ON]->(p) SET o = row.props", id=record.id, rows=on).consume()  # fmt: skip
    rows = [{"a": r["key_a"], "b": r["key_b"], "props": {"diff": record.id, **{k: _clean(r[k]) for k in (
            "decoder_cos", "encoder_cos", "act_corr", "score", "method") if _clean(r.get(k)) is not None}}}
            for r in record.alignments]  # fmt: skip
    summary = tx.run(
        "UNWIND $rows AS row MATCH (fa:Feature {key: row.a}) MATCH (fb:Feature {key: row.b}) "
        "CREATE (fa)-[r:ALIGNS_WITH]->(fb) SET r = row.props",
        rows=rows,
    ).consume()
    return int(summary.counters.relationships_created)


class DiffStore:
    """Writes, reads and deletes diffs in Neo4j and `duckdb_path`."""

    def __init__(self, driver: Driver, duckdb_path: str | Path, database: str = "neo4j") -> None:
        self.driver, self.duckdb_path, self.database = driver, Path(duckdb_path), database

    def write(self, record: DiffRecord) -> int:
        """Store `record` in both stores or in neither; returns the number of ALIGNS_WITH relationships created."""
        if not record.prompts:
            raise DiffStoreError("a diff without prompts cannot be stored")
        ensure_diff_schema(self.driver, self.database)
        self.duckdb_path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(self.duckdb_path))
        try:
            _create_tables(con)
            con.execute("BEGIN TRANSACTION")
            try:
                for table, rows in (("diffs", [record.properties]), ("diff_alignments", record.alignments),
                                    ("diff_prompts", record.prompts), ("diff_changes", record.changes)):  # fmt: skip
                    columns = list(TABLES[table])
                    values = [[record.id if c == "diff_id" else _clean(row.get(c)) for c in columns] for row in rows]
                    if values:
                        con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(columns))})", values)
                with self.driver.session(database=self.database) as session:
                    created = session.execute_write(_write_neo4j, record)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            try:
                con.execute("COMMIT")
            except BaseException:
                self.delete_neo4j(record.id)
                raise
        finally:
            con.close()
        return created

    def delete_neo4j(self, diff_id: str) -> None:
        self.driver.execute_query("MATCH ()-[r:ALIGNS_WITH {diff: $id}]->() DELETE r", id=diff_id,
                                  database_=self.database)  # fmt: skip
        self.driver.execute_query("MATCH (d:Diff {id: $id}) DETACH DELETE d", id=diff_id, database_=self.database)

    def delete(self, diff_id: str) -> None:
        """Remove a stored diff from both stores."""
        self.delete_neo4j(diff_id)
        if self.duckdb_path.exists():
            with duckdb.connect(str(self.duckdb_path)) as con:
                _create_tables(con)
                for table in TABLES:
                    con.execute(f"DELETE FROM {table} WHERE {'id' if table == 'diffs' else 'diff_id'} = ?", [diff_id])

    def read_prompts(self, diff_id: str) -> list[dict[str, Any]]:
        """The per-prompt rows of a stored diff (DuckDB), most changed first."""
        if not self.duckdb_path.exists():
            return []
        with duckdb.connect(str(self.duckdb_path), read_only=True) as con:
            cursor = con.execute("SELECT * FROM diff_prompts WHERE diff_id = ? ORDER BY similarity, text", [diff_id])
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
