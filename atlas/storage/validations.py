"""Validation results in the stores: `(:Validation)` nodes in Neo4j and two DuckDB tables, all or nothing.

Neo4j (schema additions, see `atlas.storage.graph_schema`):

    (:Validation {id, created_at, label, circuit, target, mode, transcoder, model, n_null, seed, alpha,
                  n_prompts, n_skipped, pass_fraction, necessity_zero, necessity_zero_std, necessity_mean,
                  sufficiency_frozen_errors, sufficiency_frozen_errors_std, sufficiency_ablated_errors, agreement})
        -[:TESTS]->(:Feature)                               one per circuit feature
        -[:ON {necessity_zero, necessity_mean, sufficiency_frozen_errors, sufficiency_ablated_errors,
               necessity_p, necessity_z, sufficiency_p, sufficiency_z, beats_null, agreement, clean,
               logit_change_zero, prob_change_zero, null_necessity, null_sufficiency}]->(:Prompt)
    (:Prompt {agreement})                                   the Spearman agreement of the prompt's latest validation

Aggregates on the Validation node are means over its prompts (`_std`: sample spread); undefined values (NaN, e.g.
no mean activations, or no agreement measured) are stored as absent properties.

DuckDB (`validations.duckdb`, next to the feature statistics): `validations` (one row per Validation, the same
columns as the node) and `validation_prompts` (one row per (validation, prompt)).

Atomicity: the DuckDB rows are inserted inside an open DuckDB transaction; the Neo4j node and its relationships
are created in one Neo4j transaction (which first checks that every feature and prompt exists, and raises naming
the missing ones); only when that commits is the DuckDB transaction committed. If Neo4j fails, DuckDB rolls back; if
the DuckDB commit fails, the committed Validation node is deleted again. A process killed before the Neo4j commit
leaves an uncommitted transaction on each side, which both databases discard; one killed in the short window between
the Neo4j commit and the DuckDB commit leaves a complete Validation node in Neo4j with no DuckDB rows (never a
partial node). This module runs no model.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
from neo4j import Driver, ManagedTransaction

from atlas.attribution.graph import feature_key
from atlas.storage.graph_schema import FEATURE, PROMPT, REL_ON, REL_TESTS, VALIDATION
from atlas.validation.validate import ValidationReport

PROMPT_METRICS: tuple[str, ...] = (
    "clean",
    "necessity_zero",
    "necessity_mean",
    "logit_change_zero",
    "prob_change_zero",
    "sufficiency_frozen_errors",
    "sufficiency_ablated_errors",
    "necessity_p",
    "necessity_z",
    "sufficiency_p",
    "sufficiency_z",
    "agreement",
)


class ValidationStoreError(ValueError):
    """A validation cannot be stored (unknown features or prompts, prompts without ids); nothing was written."""


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass
class ValidationRecord:
    """What is stored of one `ValidationReport`."""

    id: str
    properties: dict[str, Any]  # the Validation node's (and the `validations` row's) columns
    feature_keys: list[str]
    prompts: list[dict[str, Any]] = field(default_factory=list)  # prompt_id + PROMPT_METRICS + beats_null + nulls


def record_from_report(
    report: ValidationReport, *, transcoder_id: str, model: str, label: str = "", validation_id: str | None = None
) -> ValidationRecord:
    missing = [p.prompt for p in report.prompts if p.prompt_id is None]
    if missing:
        raise ValidationStoreError(f"{len(missing)} validated prompt(s) have no stored prompt id, e.g. {missing[0]!r}")
    vid = validation_id or f"validation-{uuid.uuid4().hex[:16]}"
    keys = [feature_key(transcoder_id, layer, feature) for layer, feature in report.circuit.features]
    properties: dict[str, Any] = {
        "id": vid,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "label": label or report.circuit.label,
        "circuit": keys,
        "target": report.target,
        "mode": report.mode,
        "transcoder": transcoder_id,
        "model": model,
        "n_null": report.config.n_null,
        "seed": report.config.seed,
        "alpha": report.config.alpha,
        "n_prompts": len(report.prompts),
        "n_skipped": len(report.skipped),
        "pass_fraction": _finite(report.pass_fraction),
    }
    for metric in ("necessity_zero", "necessity_mean", "sufficiency_frozen_errors", "sufficiency_ablated_errors",
                   "agreement"):  # fmt: skip
        summary = report.summary(metric)
        properties[metric] = _finite(summary.mean)
        if metric in ("necessity_zero", "sufficiency_frozen_errors"):
            properties[f"{metric}_std"] = _finite(summary.std)
    prompts = []
    for p in report.prompts:
        row: dict[str, Any] = {"prompt_id": p.prompt_id, "beats_null": p.beats_null}
        row.update({metric: _finite(float(getattr(p, metric))) for metric in PROMPT_METRICS})
        row["null_necessity"] = [_finite(v) or 0.0 for v in p.null_necessity]
        row["null_sufficiency"] = [_finite(v) or 0.0 for v in p.null_sufficiency]
        prompts.append(row)
    return ValidationRecord(vid, properties, keys, prompts)


# Test hook: called inside the Neo4j transaction after each statement with its name.
StatementHook = Callable[[str], None]


def _write_neo4j(tx: ManagedTransaction, record: ValidationRecord, hook: StatementHook | None) -> None:
    missing = tx.run(
        f"UNWIND $keys AS k OPTIONAL MATCH (f:{FEATURE} {{key: k}}) WITH k, f WHERE f IS NULL RETURN collect(k) AS m",
        keys=record.feature_keys,
    ).single(strict=True)["m"]
    if missing:
        raise ValidationStoreError(f"unknown feature key(s) {missing}: not in the store; nothing was written")
    prompt_ids = [row["prompt_id"] for row in record.prompts]
    missing = tx.run(
        f"UNWIND $ids AS i OPTIONAL MATCH (p:{PROMPT} {{id: i}}) WITH i, p WHERE p IS NULL RETURN collect(i) AS m",
        ids=prompt_ids,
    ).single(strict=True)["m"]
    if missing:
        raise ValidationStoreError(f"unknown prompt id(s) {missing}: not in the store; nothing was written")
    properties = {k: v for k, v in record.properties.items() if v is not None}
    tx.run(f"CREATE (v:{VALIDATION}) SET v = $props", props=properties).consume()
    if hook:
        hook("validation")
    tx.run(
        f"MATCH (v:{VALIDATION} {{id: $id}}) UNWIND $keys AS k MATCH (f:{FEATURE} {{key: k}}) "
        f"CREATE (v)-[:{REL_TESTS}]->(f)",
        id=record.id,
        keys=record.feature_keys,
    ).consume()
    if hook:
        hook("features")
    rows = [
        {"prompt_id": r["prompt_id"], "props": {k: v for k, v in r.items() if k != "prompt_id" and v is not None}}
        for r in record.prompts
    ]
    tx.run(
        f"MATCH (v:{VALIDATION} {{id: $id}}) UNWIND $rows AS r MATCH (p:{PROMPT} {{id: r.prompt_id}}) "
        f"CREATE (v)-[o:{REL_ON}]->(p) SET o = r.props, p.agreement = r.props.agreement",
        id=record.id,
        rows=rows,
    ).consume()
    if hook:
        hook("prompts")


_VALIDATION_COLUMNS: Mapping[str, str] = {
    "id": "VARCHAR PRIMARY KEY",
    "created_at": "VARCHAR",
    "label": "VARCHAR",
    "circuit": "VARCHAR[]",
    "target": "VARCHAR",
    "mode": "VARCHAR",
    "transcoder": "VARCHAR",
    "model": "VARCHAR",
    "n_null": "INTEGER",
    "seed": "INTEGER",
    "alpha": "DOUBLE",
    "n_prompts": "INTEGER",
    "n_skipped": "INTEGER",
    "pass_fraction": "DOUBLE",
    "necessity_zero": "DOUBLE",
    "necessity_zero_std": "DOUBLE",
    "necessity_mean": "DOUBLE",
    "sufficiency_frozen_errors": "DOUBLE",
    "sufficiency_frozen_errors_std": "DOUBLE",
    "sufficiency_ablated_errors": "DOUBLE",
    "agreement": "DOUBLE",
}
_PROMPT_COLUMNS: Mapping[str, str] = {
    "validation_id": "VARCHAR",
    "prompt_id": "VARCHAR",
    "beats_null": "BOOLEAN",
    **{metric: "DOUBLE" for metric in PROMPT_METRICS},
    "null_necessity": "DOUBLE[]",
    "null_sufficiency": "DOUBLE[]",
}


def _create_tables(con: duckdb.DuckDBPyConnection) -> None:
    columns = ", ".join(f"{name} {kind}" for name, kind in _VALIDATION_COLUMNS.items())
    con.execute(f"CREATE TABLE IF NOT EXISTS validations ({columns})")
    columns = ", ".join(f"{name} {kind}" for name, kind in _PROMPT_COLUMNS.items())
    con.execute(f"CREATE TABLE IF NOT EXISTS validation_prompts ({columns}, PRIMARY KEY (validation_id, prompt_id))")


class ValidationStore:
    """Writes and reads validation results in Neo4j (`driver`, `database`) and DuckDB (`duckdb_path`)."""

    def __init__(self, driver: Driver, duckdb_path: str | Path, database: str = "neo4j") -> None:
        self.driver = driver
        self.database = database
        self.duckdb_path = Path(duckdb_path)

    def write(self, record: ValidationRecord, *, hook: StatementHook | None = None) -> str:
        """Store `record` in both stores, or in neither (see the module docstring); returns its id."""
        if not record.prompts:
            raise ValidationStoreError("a validation without prompts cannot be stored")

        def insert(con: duckdb.DuckDBPyConnection) -> None:
            row = [record.properties.get(name) for name in _VALIDATION_COLUMNS]
            con.execute(f"INSERT INTO validations VALUES ({', '.join('?' * len(row))})", row)
            for prompt in record.prompts:
                values = [record.id, *(prompt.get(name) for name in list(_PROMPT_COLUMNS)[1:])]
                con.execute(f"INSERT INTO validation_prompts VALUES ({', '.join('?' * len(values))})", values)

        write_both(self.duckdb_path, _create_tables, insert, self.driver, self.database,
                   lambda tx: _write_neo4j(tx, record, hook), lambda: self.delete_neo4j(record.id), hook)  # fmt: skip
        return record.id

    def delete_neo4j(self, validation_id: str) -> None:
        self.driver.execute_query(
            f"MATCH (v:{VALIDATION} {{id: $id}}) DETACH DELETE v", id=validation_id, database_=self.database
        )

    def delete(self, validation_id: str) -> None:
        """Remove a stored validation from both stores (the Prompt `agreement` values stay)."""
        self.delete_neo4j(validation_id)
        if self.duckdb_path.exists():
            with duckdb.connect(str(self.duckdb_path)) as con:
                _create_tables(con)
                con.execute("DELETE FROM validation_prompts WHERE validation_id = ?", [validation_id])
                con.execute("DELETE FROM validations WHERE id = ?", [validation_id])

    def read(self, validation_id: str) -> ValidationRecord | None:
        """The stored record as Neo4j holds it (properties, tested features, per-prompt relationships)."""
        records = self.driver.execute_query(
            f"MATCH (v:{VALIDATION} {{id: $id}}) "
            f"OPTIONAL MATCH (v)-[:{REL_TESTS}]->(f:{FEATURE}) WITH v, collect(f.key) AS keys "
            f"OPTIONAL MATCH (v)-[o:{REL_ON}]->(p:{PROMPT}) "
            "RETURN properties(v) AS v, keys, collect(CASE WHEN p IS NULL THEN null ELSE "
            "{prompt_id: p.id, props: properties(o)} END) AS prompts",
            id=validation_id,
            database_=self.database,
        ).records
        if not records:
            return None
        r = records[0]
        prompts = [{"prompt_id": row["prompt_id"], **row["props"]} for row in r["prompts"]]
        return ValidationRecord(validation_id, dict(r["v"]), sorted(r["keys"]), sorted(prompts, key=_by_prompt))


def write_both(
    duckdb_path: Path,
    create_tables: Callable[[duckdb.DuckDBPyConnection], None],
    insert: Callable[[duckdb.DuckDBPyConnection], None],
    driver: Driver,
    database: str,
    write_neo4j: Callable[[ManagedTransaction], None],
    undo_neo4j: Callable[[], None],
    hook: StatementHook | None = None,
) -> None:
    """All or nothing in DuckDB and Neo4j: `insert` runs in an open DuckDB transaction, then `write_neo4j` in one
    Neo4j transaction; DuckDB commits only after Neo4j did, and a failed DuckDB commit runs `undo_neo4j`."""
    duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(duckdb_path))
    try:
        create_tables(con)
        con.execute("BEGIN TRANSACTION")
        try:
            insert(con)
            with driver.session(database=database) as session:
                session.execute_write(write_neo4j)
        except BaseException:
            con.execute("ROLLBACK")
            raise
        try:
            if hook:
                hook("duckdb-commit")
            con.execute("COMMIT")
        except BaseException:
            undo_neo4j()
            raise
    finally:
        con.close()


def _by_prompt(row: Mapping[str, Any]) -> str:
    return str(row["prompt_id"])
