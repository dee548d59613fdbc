"""Edit results in the stores: `(:Edit)` nodes in Neo4j and two DuckDB tables, all or nothing.

Neo4j (schema additions, see `atlas.storage.graph_schema`):

    (:Edit {id, created_at, label, operation, value, features, transcoder, model, mode, n_target, n_control,
            target_logit_change, target_prob_change, accuracy_before, accuracy_after, target_kl, control_kl,
            control_top1_agreement})
        -[:EDITS]->(:Feature)                                  one per edited feature
        -[:MEASURED_ON {role, position, answer, answer_logit_change, answer_prob_change, correct_before,
                        correct_after, kl, top1_same, generation_before, generation_after}]->(:Prompt)
                                                               one per measured prompt that is a stored prompt

Prompts that are not stored (read from a file) have no relationship; their rows are in DuckDB with their text.
Aggregates on the node are means over its prompts (`accuracy_*`: share of target prompts whose top-1 is the answer;
undefined values, e.g. no answers known, are absent properties).

DuckDB (`validations.duckdb`, beside the validation tables): `edits` (one row per Edit, the node's columns) and
`edit_prompts` (one row per (edit, role, position): the prompt id when stored, its text and the measures).

Atomicity as for validations (`atlas.storage.validations.write_both`): DuckDB commits only after the Neo4j
transaction did, which first checks that every feature and stored prompt exists. This module runs no model.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
from neo4j import Driver, ManagedTransaction

from atlas.storage.graph_schema import EDIT, FEATURE, PROMPT, REL_EDITS, REL_MEASURED_ON
from atlas.storage.validations import StatementHook, write_both
from atlas.validation.edits import EditReport


class EditStoreError(ValueError):
    """An edit cannot be stored (unknown features or prompts, no prompts); nothing was written."""


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass
class EditRecord:
    """What is stored of one `EditReport`."""

    id: str
    properties: dict[str, Any]  # the Edit node's (and the `edits` row's) columns
    feature_keys: list[str]
    prompts: list[dict[str, Any]] = field(default_factory=list)  # role, position, prompt_id (or None), text, ...


def record_from_edit(
    report: EditReport,
    *,
    feature_keys: Sequence[str],
    transcoder_id: str,
    model: str,
    target_ids: Sequence[str | None],
    control_ids: Sequence[str | None],
    edit_id: str | None = None,
) -> EditRecord:
    """The record of `report`; `target_ids`/`control_ids` give each measured prompt's stored id (None: not stored)."""
    if len(target_ids) != len(report.target) or len(control_ids) != len(report.control):
        raise EditStoreError(
            f"{len(target_ids)}/{len(control_ids)} prompt ids for {len(report.target)}/{len(report.control)} prompts"
        )
    eid = edit_id or f"edit-{uuid.uuid4().hex[:16]}"
    probs = [p.answer_prob_change for p in report.target]
    properties: dict[str, Any] = {
        "id": eid,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "label": report.edit.label,
        "operation": report.edit.operation,
        "value": float(report.edit.value),
        "features": list(feature_keys),
        "transcoder": transcoder_id,
        "model": model,
        "mode": report.mode,
        "n_target": len(report.target),
        "n_control": len(report.control),
        "target_logit_change": _finite(report.target_logit_change),
        "target_prob_change": _finite(EditReport._mean(probs)),
        "accuracy_before": _finite(report.accuracy(after=False)),
        "accuracy_after": _finite(report.accuracy(after=True)),
        "target_kl": _finite(EditReport._mean([p.kl for p in report.target])),
        "control_kl": _finite(report.control_kl),
        "control_top1_agreement": _finite(report.control_top1_agreement),
    }
    generations = {text: (before, after) for text, before, after in report.generations}
    rows: list[dict[str, Any]] = []
    for role, measured, ids in (("target", report.target, target_ids), ("control", report.control, control_ids)):
        for position, (p, pid) in enumerate(zip(measured, ids, strict=True)):
            before, after = generations.get(p.prompt, (None, None)) if role == "target" else (None, None)
            rows.append({
                "role": role, "position": position, "prompt_id": pid, "text": p.prompt, "answer": p.answer,
                "answer_logit_change": _finite(p.answer_logit_change),
                "answer_prob_change": _finite(p.answer_prob_change), "correct_before": p.correct_before,
                "correct_after": p.correct_after, "kl": _finite(p.kl), "top1_same": p.top1_same,
                "generation_before": before, "generation_after": after,
            })  # fmt: skip
    return EditRecord(eid, properties, list(feature_keys), rows)


_EDIT_COLUMNS: Mapping[str, str] = {
    "id": "VARCHAR PRIMARY KEY",
    "created_at": "VARCHAR",
    "label": "VARCHAR",
    "operation": "VARCHAR",
    "value": "DOUBLE",
    "features": "VARCHAR[]",
    "transcoder": "VARCHAR",
    "model": "VARCHAR",
    "mode": "VARCHAR",
    "n_target": "INTEGER",
    "n_control": "INTEGER",
    "target_logit_change": "DOUBLE",
    "target_prob_change": "DOUBLE",
    "accuracy_before": "DOUBLE",
    "accuracy_after": "DOUBLE",
    "target_kl": "DOUBLE",
    "control_kl": "DOUBLE",
    "control_top1_agreement": "DOUBLE",
}
_EDIT_PROMPT_COLUMNS: Mapping[str, str] = {
    "edit_id": "VARCHAR",
    "role": "VARCHAR",
    "position": "INTEGER",
    "prompt_id": "VARCHAR",
    "text": "VARCHAR",
    "answer": "VARCHAR",
    "answer_logit_change": "DOUBLE",
    "answer_prob_change": "DOUBLE",
    "correct_before": "BOOLEAN",
    "correct_after": "BOOLEAN",
    "kl": "DOUBLE",
    "top1_same": "BOOLEAN",
    "generation_before": "VARCHAR",
    "generation_after": "VARCHAR",
}


def _create_tables(con: duckdb.DuckDBPyConnection) -> None:
    columns = ", ".join(f"{name} {kind}" for name, kind in _EDIT_COLUMNS.items())
    con.execute(f"CREATE TABLE IF NOT EXISTS edits ({columns})")
    columns = ", ".join(f"{name} {kind}" for name, kind in _EDIT_PROMPT_COLUMNS.items())
    con.execute(f"CREATE TABLE IF NOT EXISTS edit_prompts ({columns}, PRIMARY KEY (edit_id, role, position))")


def _write_neo4j(tx: ManagedTransaction, record: EditRecord, hook: StatementHook | None) -> None:
    missing = tx.run(
        f"UNWIND $keys AS k OPTIONAL MATCH (f:{FEATURE} {{key: k}}) WITH k, f WHERE f IS NULL RETURN collect(k) AS m",
        keys=record.feature_keys,
    ).single(strict=True)["m"]
    if missing:
        raise EditStoreError(f"unknown feature key(s) {missing}: not in the store; nothing was written")
    stored = [row for row in record.prompts if row["prompt_id"] is not None]
    missing = tx.run(
        f"UNWIND $ids AS i OPTIONAL MATCH (p:{PROMPT} {{id: i}}) WITH i, p WHERE p IS NULL RETURN collect(i) AS m",
        ids=sorted({row["prompt_id"] for row in stored}),
    ).single(strict=True)["m"]
    if missing:
        raise EditStoreError(f"unknown prompt id(s) {missing}: not in the store; nothing was written")
    tx.run(f"CREATE (e:{EDIT}) SET e = $props", props={k: v for k, v in record.properties.items() if v is not None})
    if hook:
        hook("edit")
    tx.run(
        f"MATCH (e:{EDIT} {{id: $id}}) UNWIND $keys AS k MATCH (f:{FEATURE} {{key: k}}) CREATE (e)-[:{REL_EDITS}]->(f)",
        id=record.id,
        keys=record.feature_keys,
    ).consume()
    if hook:
        hook("features")
    skip = ("prompt_id", "text")
    rows = [
        {"prompt_id": r["prompt_id"], "props": {k: v for k, v in r.items() if k not in skip and v is not None}}
        for r in stored
    ]
    tx.run(
        f"MATCH (e:{EDIT} {{id: $id}}) UNWIND $rows AS r MATCH (p:{PROMPT} {{id: r.prompt_id}}) "
        f"CREATE (e)-[m:{REL_MEASURED_ON}]->(p) SET m = r.props",
        id=record.id,
        rows=rows,
    ).consume()
    if hook:
        hook("prompts")


class EditStore:
    """Writes and reads edit results in Neo4j (`driver`, `database`) and DuckDB (`duckdb_path`)."""

    def __init__(self, driver: Driver, duckdb_path: str | Path, database: str = "neo4j") -> None:
        self.driver = driver
        self.database = database
        self.duckdb_path = Path(duckdb_path)

    def write(self, record: EditRecord, *, hook: StatementHook | None = None) -> str:
        """Store `record` in both stores or in neither; returns its id."""
        if not any(row["role"] == "target" for row in record.prompts):
            raise EditStoreError("an edit without target prompts cannot be stored")

        def insert(con: duckdb.DuckDBPyConnection) -> None:
            row = [record.properties.get(name) for name in _EDIT_COLUMNS]
            con.execute(f"INSERT INTO edits VALUES ({', '.join('?' * len(row))})", row)
            for prompt in record.prompts:
                values = [record.id, *(prompt.get(name) for name in list(_EDIT_PROMPT_COLUMNS)[1:])]
                con.execute(f"INSERT INTO edit_prompts VALUES ({', '.join('?' * len(values))})", values)

        write_both(self.duckdb_path, _create_tables, insert, self.driver, self.database,
                   lambda tx: _write_neo4j(tx, record, hook), lambda: self.delete_neo4j(record.id), hook)  # fmt: skip
        return record.id

    def delete_neo4j(self, edit_id: str) -> None:
        self.driver.execute_query(f"MATCH (e:{EDIT} {{id: $id}}) DETACH DELETE e", id=edit_id, database_=self.database)

    def delete(self, edit_id: str) -> None:
        """Remove a stored edit from both stores."""
        self.delete_neo4j(edit_id)
        if self.duckdb_path.exists():
            with duckdb.connect(str(self.duckdb_path)) as con:
                _create_tables(con)
                con.execute("DELETE FROM edit_prompts WHERE edit_id = ?", [edit_id])
                con.execute("DELETE FROM edits WHERE id = ?", [edit_id])

    def read(self, edit_id: str) -> EditRecord | None:
        """The stored record as Neo4j holds it (properties, edited features, relationships to stored prompts)."""
        records = self.driver.execute_query(
            f"MATCH (e:{EDIT} {{id: $id}}) "
            f"OPTIONAL MATCH (e)-[:{REL_EDITS}]->(f:{FEATURE}) WITH e, collect(f.key) AS keys "
            f"OPTIONAL MATCH (e)-[m:{REL_MEASURED_ON}]->(p:{PROMPT}) "
            "RETURN properties(e) AS e, keys, collect(CASE WHEN p IS NULL THEN null ELSE "
            "{prompt_id: p.id, props: properties(m)} END) AS prompts",
            id=edit_id,
            database_=self.database,
        ).records
        if not records:
            return None
        r = records[0]
        prompts = [{"prompt_id": row["prompt_id"], **row["props"]} for row in r["prompts"]]
        prompts.sort(key=lambda row: (row["role"] != "target", row["position"]))
        return EditRecord(edit_id, dict(r["e"]), sorted(r["keys"]), prompts)

    def rows(self, edit_id: str) -> list[dict[str, Any]]:
        """The DuckDB `edit_prompts` rows of an edit, targets first, in measured order."""
        if not self.duckdb_path.exists():
            return []
        with duckdb.connect(str(self.duckdb_path), read_only=True) as con:
            tables = {row[0] for row in con.execute("SHOW TABLES").fetchall()}
            if "edit_prompts" not in tables:
                return []
            cursor = con.execute("SELECT * FROM edit_prompts WHERE edit_id = ? ORDER BY role DESC, position", [edit_id])
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
