"""Feature labels in the Neo4j store: automatic labels pushed from DuckDB, user labels with their history, and
JSON import/export. This is the only module that writes labels; everything else reads the Feature properties.

On a `(:Feature)`:

    auto_label          the automatic label (`atlas.storage.auto_labels`), copied from DuckDB's `feature_labels`
    user_label          a person's label (None when cleared); user_note, label_author, label_updated_at beside it,
                        and label_score when the label came from the explainer (`atlas.storage.explainer`)
    label               what every reader shows: user_label when set, else auto_label (kept equal to
                        coalesce(user_label, auto_label) by the two writes below, and indexed for search)

History: every user write (set, edit, clear, import) adds a `(:LabelRevision {seq, label, note, author, at,
source})-[:REVISES]->(:Feature)` holding what was written, so no earlier label is ever lost; `label_history` reads
them back newest first. The identity migration (`identities.merge_transcoders`) moves revisions and user labels
with their Feature.

Writes:
- `push_auto_labels` (ingest, after every statistics rebuild) sets `auto_label` and `label` on the Features that
  exist;
- `write_user_labels` is the one user write path (the app's edit widgets, `atlas labels import`): one
  parameterised statement in one transaction. Every row is validated first (`validate_text`: length, no control
  characters), then every feature must exist, else `LabelError` names the problem and nothing is written.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, LiteralString

from neo4j import Driver, ManagedTransaction

from atlas.attribution.graph import feature_key
from atlas.storage.feature_stats import FeatureStatsStore

MAX_LABEL_CHARS = 80
MAX_NOTE_CHARS = 2_000
MAX_AUTHOR_CHARS = 80
EXPORT_FORMAT = "circuit-atlas-labels"
EXPORT_VERSION = 1
PUSH_BATCH = 5_000

REVISION = "LabelRevision"
REL_REVISES = "REVISES"


class LabelError(ValueError):
    """Bad label input (text, unknown feature, a file for another dictionary); nothing was written."""


@dataclass(frozen=True)
class LabelEdit:
    """One user write: `label` None (or empty) clears the user label; `note` None (or empty) clears the note."""

    key: str
    label: str | None
    note: str | None = None
    author: str | None = None
    at: datetime | None = None  # when it was written (an import keeps the exported time); None: now
    score: float | None = None  # the explainer's detection score of this label (0..1); None for people's labels


@dataclass(frozen=True)
class FeatureLabel:
    key: str
    transcoder: str
    layer: int
    index: int
    label: str | None  # shown: user label, else automatic
    auto_label: str | None
    user_label: str | None
    note: str | None
    author: str | None
    updated_at: datetime | None
    score: float | None = None  # detection score when the label came from the explainer


@dataclass(frozen=True)
class Revision:
    seq: int
    label: str | None
    note: str | None
    author: str | None
    at: datetime
    source: str
    score: float | None = None


# -- validation --------------------------------------------------------------------------------------------------


def validate_text(text: str | None, *, what: str, limit: int, multiline: bool = False) -> str | None:
    """`text` stripped (None when empty); LabelError when it is not a string, too long or holds control characters
    (a note may hold newlines and tabs)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise LabelError(f"{what} must be text, got {type(text).__name__}")
    text = text.strip()
    if not text:
        return None
    allowed = {"\u200d", "\n", "\t"} if multiline else {"\u200d"}  # ZWJ joins emoji; bidi overrides are refused
    bad = [ch for ch in text if ch not in allowed and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn")]
    if bad:
        raise LabelError(f"{what} holds a control or unassigned character ({bad[0]!a}); remove it")
    if len(text) > limit:
        raise LabelError(f"{what} is {len(text)} characters long; at most {limit} are allowed")
    return text


def _rows(edits: Sequence[LabelEdit], source: str, now: datetime) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for edit in edits:
        if not isinstance(edit.key, str) or not re.fullmatch(r".+/\d+/\d+", edit.key):
            raise LabelError(f"{edit.key!r} is not a feature key (expected DICTIONARY/LAYER/INDEX)")
        if edit.key in seen:
            raise LabelError(f"feature {edit.key} is labelled twice in one write")
        seen.add(edit.key)
        if edit.score is not None and not (isinstance(edit.score, int | float) and 0.0 <= edit.score <= 1.0):
            raise LabelError(f"score of {edit.key} must be a number in [0, 1], got {edit.score!r}")
        rows.append(
            {
                "key": edit.key,
                "label": validate_text(edit.label, what=f"label of {edit.key}", limit=MAX_LABEL_CHARS),
                "note": validate_text(edit.note, what=f"note of {edit.key}", limit=MAX_NOTE_CHARS, multiline=True),
                "author": validate_text(edit.author, what="author name", limit=MAX_AUTHOR_CHARS),
                "at": edit.at or now,
                "source": source,
                "score": None if edit.score is None else float(edit.score),
            }
        )
    return rows


# -- the user write path -----------------------------------------------------------------------------------------

_MISSING: LiteralString = """
UNWIND $keys AS k
OPTIONAL MATCH (f:Feature {key: k})
WITH k, f WHERE f IS NULL
RETURN collect(k) AS missing
"""

# The SET comes first: it write-locks the Feature, so a concurrent edit of the same feature waits and then numbers
# its revision after this one.
_WRITE_USER_LABELS: LiteralString = """
UNWIND $rows AS row
MATCH (f:Feature {key: row.key})
SET f.user_label = row.label, f.user_note = row.note, f.label_author = row.author, f.label_updated_at = row.at,
    f.label_score = row.score, f.label = coalesce(row.label, f.auto_label)
WITH f, row
CALL (f) { OPTIONAL MATCH (r:LabelRevision)-[:REVISES]->(f) RETURN coalesce(max(r.seq), 0) AS last }
CREATE (rev:LabelRevision {seq: last + 1, label: row.label, note: row.note, author: row.author, at: row.at,
                           source: row.source, score: row.score})-[:REVISES]->(f)
RETURN count(f) AS n
"""


def _write(tx: ManagedTransaction, rows: list[dict[str, Any]]) -> int:
    record = tx.run(_MISSING, keys=[r["key"] for r in rows]).single()
    missing = list(record["missing"]) if record else []
    if missing:  # raising inside the transaction function rolls it back: nothing is written
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LabelError(f"unknown feature(s), not in the store: {shown}; nothing was written")
    written = tx.run(_WRITE_USER_LABELS, rows=rows).single()
    return int(written["n"]) if written else 0


def write_user_labels(
    driver: Driver, edits: Sequence[LabelEdit], *, database: str = "neo4j", source: str = "app",
    now: datetime | None = None,
) -> int:  # fmt: skip
    """Set (or clear) user labels and notes in one transaction, with a history revision each; returns how many.
    LabelError (nothing written) on bad text, a malformed or unknown key, or a key given twice."""
    if not edits:
        return 0
    rows = _rows(edits, source, now or datetime.now(UTC))
    with driver.session(database=database) as session:
        return int(session.execute_write(_write, rows))


# -- reading -----------------------------------------------------------------------------------------------------

_READ: LiteralString = """
MATCH (f:Feature {key: $key})
RETURN f.key AS key, f.transcoder AS transcoder, f.layer AS layer, f.index AS index, properties(f) AS p
"""


def _feature_label(record: Mapping[str, Any]) -> FeatureLabel:
    p = record["p"]
    updated = p.get("label_updated_at")
    return FeatureLabel(
        key=record["key"], transcoder=record["transcoder"], layer=int(record["layer"]), index=int(record["index"]),
        label=p.get("label"), auto_label=p.get("auto_label"), user_label=p.get("user_label"), note=p.get("user_note"),
        author=p.get("label_author"), updated_at=updated.to_native() if hasattr(updated, "to_native") else updated,
        score=p.get("label_score"),
    )  # fmt: skip


def feature_label(driver: Driver, key: str, *, database: str = "neo4j") -> FeatureLabel:
    """The labels of one feature; LabelError when it is not stored."""
    records = driver.execute_query(_READ, key=key, database_=database).records
    if not records:
        raise LabelError(f"unknown feature {key!r}: not in the store")
    return _feature_label(records[0])


def label_history(driver: Driver, key: str, *, database: str = "neo4j") -> list[Revision]:
    """Every user write of a feature's label, newest first (by time, then by sequence number)."""
    records = driver.execute_query(
        "MATCH (r:LabelRevision)-[:REVISES]->(:Feature {key: $key}) RETURN properties(r) AS r "
        "ORDER BY r.at DESC, r.seq DESC",
        key=key,
        database_=database,
    ).records
    return [
        Revision(int(r["r"]["seq"]), r["r"].get("label"), r["r"].get("note"), r["r"].get("author"),
                 r["r"]["at"].to_native(), str(r["r"].get("source", "")), r["r"].get("score"))
        for r in records
    ]  # fmt: skip


# -- automatic labels --------------------------------------------------------------------------------------------

_PUSH_AUTO: LiteralString = """
UNWIND $rows AS row
MATCH (f:Feature {key: row.key})
WHERE f.auto_label IS NULL OR f.auto_label <> row.label OR f.label IS NULL
SET f.auto_label = row.label, f.label = coalesce(f.user_label, row.label)
RETURN count(f) AS n
"""


def push_auto_labels(
    driver: Driver, stats: FeatureStatsStore, *, transcoder_ids: Iterable[str] | None = None, database: str = "neo4j"
) -> int:
    """Copy DuckDB's automatic labels onto the stored Features (those that exist; only changed ones are written);
    returns how many Features changed."""
    labels = stats.auto_labels(None if transcoder_ids is None else set(transcoder_ids))
    rows = [{"key": feature_key(t, layer, index), "label": label} for (t, layer, index), label in labels.items()]
    changed = 0
    for start in range(0, len(rows), PUSH_BATCH):
        records = driver.execute_query(_PUSH_AUTO, rows=rows[start : start + PUSH_BATCH], database_=database).records
        changed += int(records[0]["n"])
    return changed


# -- export and import -------------------------------------------------------------------------------------------


def export_labels(driver: Driver, dictionary: str, *, database: str = "neo4j") -> dict[str, Any]:
    """The user labels of one dictionary as a JSON-ready document keyed by dictionary id, layer and index (the
    automatic label rides along for reference; import ignores it)."""
    exists = driver.execute_query(
        "MATCH (t:Transcoder {id: $id}) RETURN count(t) AS n", id=dictionary, database_=database
    ).records
    if not exists[0]["n"]:
        raise LabelError(f"unknown dictionary {dictionary!r}: no Transcoder with that id in the store")
    records = driver.execute_query(
        """
        MATCH (f:Feature) WHERE f.transcoder = $id AND f.layer IS NOT NULL AND f.index IS NOT NULL
          AND (f.user_label IS NOT NULL OR f.user_note IS NOT NULL)
        RETURN f.layer AS layer, f.index AS index, f.user_label AS label, f.user_note AS note,
               f.label_author AS author, f.label_updated_at AS at, f.auto_label AS auto_label
        ORDER BY layer, index
        """,
        id=dictionary,
        database_=database,
    ).records
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "dictionary": dictionary,
        "labels": [
            {"layer": int(r["layer"]), "index": int(r["index"]), "label": r["label"], "note": r["note"],
             "author": r["author"], "updated_at": r["at"].to_native().isoformat() if r["at"] else None,
             "auto_label": r["auto_label"]}
            for r in records
        ],
    }  # fmt: skip


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise LabelError(f"{what} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError as err:
        raise LabelError(f"{what} must be an integer, got {value!r}") from err
    if number < 0:
        raise LabelError(f"{what} must not be negative, got {number}")
    return number


def _time(value: Any, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(str(value))
    except ValueError as err:
        raise LabelError(f"{what} is not an ISO 8601 time: {value!r}") from err
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def edits_from_export(document: Any, dictionary: str | None = None) -> tuple[str, list[LabelEdit]]:
    """(dictionary id, edits) of a `export_labels` document; LabelError on a malformed one or, when `dictionary` is
    given, a file for another dictionary."""
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise LabelError(f'not a circuit-atlas label file (expected "format": {EXPORT_FORMAT!r})')
    if document.get("version") != EXPORT_VERSION:
        raise LabelError(f"label file version {document.get('version')!r} is not supported (expected {EXPORT_VERSION})")
    source = document.get("dictionary")
    if not isinstance(source, str) or not source:
        raise LabelError("the label file names no dictionary")
    if dictionary is not None and source != dictionary:
        raise LabelError(f"the label file is for another dictionary ({source!r}, not {dictionary!r}); nothing written")
    entries = document.get("labels")
    if not isinstance(entries, list):
        raise LabelError('the label file has no "labels" list')
    edits = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise LabelError(f"labels[{i}] is not an object")
        layer, index = _int(entry.get("layer"), f"labels[{i}].layer"), _int(entry.get("index"), f"labels[{i}].index")
        at = _time(entry.get("updated_at"), f"labels[{i}].updated_at")
        edits.append(LabelEdit(feature_key(source, layer, index), entry.get("label"), entry.get("note"),
                               entry.get("author"), at))  # fmt: skip
    return source, edits


def edits_from_neuronpedia(
    records: Any, dictionary: str, *, model_id: str, source_set: str, author: str | None = None
) -> list[LabelEdit]:
    """Edits from a Neuronpedia explanations export (a list of {modelId, layer: "<n>-<source set>", index,
    description}) whose model id and source set are the ones given for `dictionary`: each explanation becomes the
    label of feature (n, index) (cut to the label limit; the full text goes to the note when longer). Several
    explanations of one feature: the first wins. LabelError when any record is for another model or source set."""
    if not isinstance(records, list):
        raise LabelError("a Neuronpedia explanations export is a JSON list of explanation objects")
    pattern = re.compile(rf"^(\d+)-{re.escape(source_set)}$")
    edits: dict[str, LabelEdit] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not {"modelId", "layer", "index", "description"} <= rec.keys():
            raise LabelError(f"explanation [{i}] lacks modelId, layer, index or description")
        match = pattern.match(str(rec["layer"]))
        if rec["modelId"] != model_id or match is None:
            raise LabelError(
                f"explanation [{i}] is for {rec['modelId']}/{rec['layer']}, not {model_id}/<layer>-{source_set}; "
                "this export belongs to another dictionary; nothing was written"
            )
        key = feature_key(dictionary, int(match[1]), _int(rec["index"], f"explanation [{i}].index"))
        text = str(rec["description"]).strip()
        if key in edits or not text:
            continue
        label = text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "…"
        note = text if len(text) > MAX_LABEL_CHARS else None
        edits[key] = LabelEdit(key, label, note, author or rec.get("explanationModelName") or "neuronpedia")
    return list(edits.values())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise LabelError(f"no label file at {path}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LabelError(f"{path} is not a JSON file ({err})") from err
