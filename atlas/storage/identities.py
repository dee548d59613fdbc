"""Transcoder identities in the Neo4j store: registering a dictionary, and merging the ids of identical dictionaries.

Since schema version 5 a `(:Transcoder {id})` is keyed by the hash of its weights and semantic configuration
(`atlas.transcoders.identity`, ids such as `clt-3fa9c1d2e4b5a6f7`); its human labels sit beside the key:

    (:Transcoder {id, model, identity: "weights", kind, config, names: [..], sources: [..]})

`names` are the directory names and `sources` the resolved directories the dictionary was ingested from (every one
seen, in order). Stores of versions <= 4 keyed a Transcoder by `<directory name>-<hash of every file>`, so one
dictionary copied, renamed or re-saved got a second id, and its prompts and features were stored twice; the
migration 4 -> 5 (`label_legacy_transcoders`) only marks those nodes `identity: "legacy"` and records the name
their id contains, because the store does not hold the weights. `merge_transcoders` does the rest once the
dictionaries are at hand (`atlas db migrate --transcoders DIR...`): for each legacy id it is given the new id, and
for each of its prompts the prompt id a single ingest under the new id would have given (the caller computes those;
this layer does not know the ingest's prompt-key rule). Per legacy id, in bounded write transactions (32 prompts or
2,000 features each; every step is idempotent and the old node goes last, so an interrupted run resumes):

1. the new Transcoder is MERGEd, taking over the old node's names, sources and model, and marked
   `aggregates_stale`;
2. each Prompt moves to its new id (Prompt id and `transcoder`, its instances' `prompt_id`); a Prompt whose new id
   is already stored (the same text ingested through another copy, or already migrated) is a duplicate and is
   deleted with its instances, so every prompt is stored once;
3. each Feature `{old}/{layer}/{index}` becomes `{new}/{layer}/{index}` (key, `transcoder`, hash `h`); where that
   Feature exists already, the old one's instances are re-pointed to it (`OF`), and so are its label revisions
   (`(:LabelRevision)-[:REVISES]->`, numbered after the survivor's; no user label or note is lost), the more
   recently written user label of the two (with its note, author and time) becomes the survivor's, its automatic
   label is kept if the survivor has none, and the old node deleted;
4. the legacy Transcoder node is deleted.

Then the aggregate layer of every Transcoder marked `aggregates_stale` is rebuilt from its prompt graphs
(`aggregate.rebuild_aggregates`) and the mark removed: the re-keyed Features have new hashes (so new pair keys), and
rebuilding from the surviving prompts is the one way that cannot count a duplicate twice. A crash between the two
leaves the mark, and the next run rebuilds; a run with nothing left to merge changes nothing (idempotent).
Do not run it while an ingest writes to the store.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, LiteralString

from neo4j import Driver, ManagedTransaction

from atlas.attribution.graph import feature_key
from atlas.storage.aggregate import node_hash, rebuild_aggregates

IDENTITY_WEIGHTS = "weights"
IDENTITY_LEGACY = "legacy"

REGISTER_TRANSCODER: LiteralString = """
MERGE (m:Model {name: $model})
MERGE (t:Transcoder {id: $id}) ON CREATE SET t.model = $model
SET t.identity = $identity, t.kind = $kind, t.config = $config,
    t.names = CASE WHEN $name IN coalesce(t.names, []) THEN t.names ELSE coalesce(t.names, []) + $name END,
    t.sources = CASE WHEN $source IN coalesce(t.sources, []) THEN t.sources ELSE coalesce(t.sources, []) + $source END
SET t += $card
MERGE (t)-[:FOR]->(m)
"""


REGISTER_MODEL: LiteralString = """
MERGE (m:Model {name: $key})
SET m.source = $source, m.weights = coalesce($weights, m.weights),
    m.names = CASE WHEN $name IN coalesce(m.names, []) THEN m.names ELSE coalesce(m.names, []) + $name END
"""


@dataclass(frozen=True)
class DictionaryLabel:
    """What a merge writes on the new Transcoder: its id and the labels of the directory it was computed from."""

    id: str
    name: str
    source: str
    kind: str
    config: Mapping[str, Any]


@dataclass
class MergeReport:
    """What `merge_transcoders` did."""

    transcoders_merged: int = 0  # legacy Transcoder nodes folded into a weights-keyed one
    prompts_moved: int = 0
    prompts_deduplicated: int = 0  # duplicate prompts deleted
    prompts_kept_id: int = 0  # prompts whose new id could not be computed (moved to the new transcoder, id kept)
    features_rekeyed: int = 0
    features_merged: int = 0
    aggregates_rebuilt: list[str] = field(default_factory=list)


def register_transcoder(
    tx: ManagedTransaction,
    transcoder_id: str,
    *,
    model: str,
    name: str,
    source: str,
    kind: str,
    config: Mapping[str, Any],
    card: Mapping[str, Any] | None = None,
) -> None:
    """MERGE the Transcoder `transcoder_id` (weights-keyed) and add `name` and `source` to its labels; `card`'s
    measured figures (`atlas.transcoders.card`) become properties of it (`ce_delta`, `replacement_score`, ...)."""
    figures = {k: v for k, v in (card or {}).items() if v is not None}
    tx.run(REGISTER_TRANSCODER, id=transcoder_id, model=model, name=name, source=source, kind=kind,
           config=json.dumps(dict(config), sort_keys=True), identity=IDENTITY_WEIGHTS,
           card=figures).consume()  # fmt: skip


def register_model(tx: ManagedTransaction, key: str, *, name: str, source: str, weights: str | None) -> None:
    """MERGE the Model `key` (`atlas.models.identity`) with its source kind, weights digest and the names given."""
    tx.run(REGISTER_MODEL, key=key, name=name, source=source, weights=weights).consume()


def label_legacy_transcoders(tx: ManagedTransaction) -> None:
    """The schema migration 4 -> 5: mark path-keyed Transcoders `legacy` and record the name their id contains."""
    tx.run(
        """
        MATCH (t:Transcoder) WHERE t.identity IS NULL
        WITH t, split(t.id, '-') AS parts
        SET t.identity = $legacy,
            t.names = coalesce(t.names, [CASE WHEN size(parts) > 1
                                         THEN reduce(s = parts[0], p IN parts[1..-1] | s + '-' + p) ELSE t.id END]),
            t.sources = coalesce(t.sources, [])
        """,
        legacy=IDENTITY_LEGACY,
    ).consume()


def transcoders(driver: Driver, database: str = "neo4j") -> list[dict[str, Any]]:
    """Every Transcoder with its labels and counts: id, model, identity, kind, names, sources, prompts, features."""
    records = driver.execute_query(
        """
        MATCH (t:Transcoder)
        CALL (t) { MATCH (p:Prompt) WHERE p.transcoder = t.id RETURN count(p) AS prompts }
        CALL (t) { MATCH (f:Feature) WHERE f.transcoder = t.id AND f.layer IS NOT NULL AND f.index IS NOT NULL
                   RETURN count(f) AS features }
        RETURN t.id AS id, t.model AS model, coalesce(t.identity, $legacy) AS identity, t.kind AS kind,
               coalesce(t.names, []) AS names, coalesce(t.sources, []) AS sources, prompts, features,
               coalesce(properties(t)['aggregates_stale'], false) AS aggregates_stale
        ORDER BY id
        """,
        legacy=IDENTITY_LEGACY,
        database_=database,
    ).records
    return [dict(r) for r in records]


def stored_prompts(driver: Driver, transcoder_id: str, database: str = "neo4j") -> list[dict[str, Any]]:
    """(id, text, model, settings) of every Prompt of `transcoder_id`, for computing their new ids."""
    records = driver.execute_query(
        "MATCH (p:Prompt) WHERE p.transcoder = $t RETURN p.id AS id, p.text AS text, p.model AS model, "
        "p.settings AS settings ORDER BY id",
        t=transcoder_id,
        database_=database,
    ).records
    return [dict(r) for r in records]


_MOVE_PROMPTS: LiteralString = """
UNWIND $rows AS row
MATCH (p:Prompt {id: row.old})
OPTIONAL MATCH (q:Prompt {id: row.new}) WHERE row.new <> row.old
WITH p, row, q
CALL (p, row, q) {
  WITH p, row, q WHERE q IS NULL
  SET p.id = row.new, p.transcoder = $new
  WITH p, row
  MATCH (n:Instance) WHERE n.prompt_id = row.old AND n.node_index IS NOT NULL
  SET n.prompt_id = row.new
  RETURN count(*) AS touched
}
WITH p, row, q
CALL (p, row, q) {
  WITH p, row, q WHERE q IS NOT NULL
  MATCH (n:Instance) WHERE n.prompt_id = row.old AND n.node_index IS NOT NULL
  DETACH DELETE n
  RETURN count(*) AS deleted
}
WITH p, q
CALL (p, q) { WITH p, q WHERE q IS NOT NULL DETACH DELETE p }
RETURN count(q) AS duplicates
"""

_MOVE_FEATURES: LiteralString = """
UNWIND $rows AS row
MATCH (f:Feature {key: row.old})
OPTIONAL MATCH (g:Feature {key: row.new})
WITH f, g, row
CALL (f, g, row) {
  WITH f, g, row WHERE g IS NULL
  SET f.key = row.new, f.transcoder = $new, f.h = row.h
}
WITH f, g
CALL (f, g) {
  WITH f, g WHERE g IS NOT NULL
  OPTIONAL MATCH (a)-[r:OF]->(f)
  WITH f, g, collect(a) AS instances, collect(r) AS links
  FOREACH (a IN instances | CREATE (a)-[:OF]->(g))
  FOREACH (r IN links | DELETE r)
  WITH f, g
  CALL (f, g) {
    OPTIONAL MATCH (kept:LabelRevision)-[:REVISES]->(g)
    WITH f, g, coalesce(max(kept.seq), 0) AS base
    OPTIONAL MATCH (rev:LabelRevision)-[x:REVISES]->(f)
    WITH g, base, collect(rev) AS revisions, collect(x) AS links
    FOREACH (rev IN revisions | SET rev.seq = rev.seq + base CREATE (rev)-[:REVISES]->(g))
    FOREACH (x IN links | DELETE x)
  }
  WITH f, g, f.label_updated_at IS NOT NULL
             AND (g.label_updated_at IS NULL OR f.label_updated_at > g.label_updated_at) AS newer
  SET g.user_label = CASE WHEN newer THEN f.user_label ELSE g.user_label END,
      g.user_note = CASE WHEN newer THEN f.user_note ELSE g.user_note END,
      g.label_author = CASE WHEN newer THEN f.label_author ELSE g.label_author END,
      g.label_updated_at = CASE WHEN newer THEN f.label_updated_at ELSE g.label_updated_at END,
      g.label_score = CASE WHEN newer THEN f.label_score ELSE g.label_score END,
      g.auto_label = coalesce(g.auto_label, f.auto_label)
  SET g.label = coalesce(g.user_label, g.auto_label, g.label, f.label)
  DETACH DELETE f
}
RETURN count(g) AS merged, count(*) AS total
"""


def _claim(tx: ManagedTransaction, old: str, label: DictionaryLabel) -> None:
    """MERGE the new Transcoder with the old one's labels and model, marked `aggregates_stale`."""
    tx.run(
        """
        MATCH (o:Transcoder {id: $old})
        MERGE (t:Transcoder {id: $new}) ON CREATE SET t.model = o.model
        SET t.identity = $identity, t.kind = $kind, t.config = $config, t.aggregates_stale = true,
            t.names = reduce(acc = coalesce(t.names, []), x IN coalesce(o.names, []) + [$name] |
                             CASE WHEN x IN acc THEN acc ELSE acc + x END),
            t.sources = reduce(acc = coalesce(t.sources, []), x IN coalesce(o.sources, []) + [$source] |
                               CASE WHEN x IN acc THEN acc ELSE acc + x END)
        WITH o, t
        OPTIONAL MATCH (o)-[:FOR]->(m:Model)
        FOREACH (model IN CASE WHEN m IS NULL THEN [] ELSE [m] END | MERGE (t)-[:FOR]->(model))
        """,
        old=old, new=label.id, identity=IDENTITY_WEIGHTS, kind=label.kind, name=label.name, source=label.source,
        config=json.dumps(dict(label.config), sort_keys=True),
    ).consume()  # fmt: skip


def _move_prompts(tx: ManagedTransaction, rows: list[dict[str, str]], new: str) -> int:
    record = tx.run(_MOVE_PROMPTS, rows=rows, new=new).single()
    return int(record["duplicates"]) if record else 0


def _move_features(tx: ManagedTransaction, rows: list[dict[str, Any]], new: str) -> int:
    record = tx.run(_MOVE_FEATURES, rows=rows, new=new).single()
    return int(record["merged"]) if record else 0


def _merge_one(
    session: Any, driver: Driver, database: str, old: str, label: DictionaryLabel,
    new_prompt_id: Callable[[Mapping[str, Any], str], str | None], prompts_per_tx: int, features_per_tx: int,
    report: MergeReport,
) -> None:  # fmt: skip
    """Fold `old` into `label.id` in bounded transactions. Each step is idempotent (a moved prompt or feature no
    longer belongs to `old`), and the old node goes last, so a run cut short resumes where it stopped."""
    session.execute_write(_claim, old, label)
    rows = []
    for prompt in stored_prompts(driver, old, database):
        new = new_prompt_id(prompt, label.id)
        report.prompts_kept_id += new is None
        rows.append({"old": prompt["id"], "new": prompt["id"] if new is None else new})
    for start in range(0, len(rows), prompts_per_tx):
        batch = rows[start : start + prompts_per_tx]
        duplicates = session.execute_write(_move_prompts, batch, label.id)
        report.prompts_deduplicated += duplicates
        report.prompts_moved += len(batch) - duplicates
    keys = [
        (r["key"], feature_key(label.id, int(r["layer"]), int(r["index"])))
        for r in driver.execute_query(
            "MATCH (f:Feature) WHERE f.transcoder = $old AND f.layer IS NOT NULL AND f.index IS NOT NULL "
            "RETURN f.key AS key, f.layer AS layer, f.index AS index ORDER BY key",
            old=old,
            database_=database,
        ).records
    ]
    features = [{"old": old_key, "new": new_key, "h": node_hash(new_key)} for old_key, new_key in keys]
    for start in range(0, len(features), features_per_tx):
        batch = features[start : start + features_per_tx]
        merged = session.execute_write(_move_features, batch, label.id)
        report.features_merged += merged
        report.features_rekeyed += len(batch) - merged
    session.execute_write(lambda tx: tx.run("MATCH (o:Transcoder {id: $old}) DETACH DELETE o", old=old).consume())
    report.transcoders_merged += 1


def merge_transcoders(
    driver: Driver,
    mapping: Mapping[str, DictionaryLabel],
    new_prompt_id: Callable[[Mapping[str, Any], str], str | None],
    *,
    database: str = "neo4j",
    prompts_per_tx: int = 32,
    features_per_tx: int = 2_000,
) -> MergeReport:
    """Fold each stored Transcoder `old` of `mapping` into `mapping[old].id` (see the module docstring).

    `new_prompt_id(prompt, new_transcoder_id)` gives a stored prompt's (id, text, model, settings) the id a single
    ingest under the new transcoder id gives it; None keeps its id. Idempotent: ids already merged are skipped, and
    the aggregate layers still marked stale are rebuilt.
    """
    report = MergeReport()
    with driver.session(database=database) as session:
        for old, label in sorted(mapping.items()):
            if old == label.id:
                continue
            exists = session.run("MATCH (o:Transcoder {id: $old}) RETURN count(o) AS n", old=old).single()
            if exists and exists["n"]:
                _merge_one(session, driver, database, old, label, new_prompt_id, prompts_per_tx, features_per_tx,
                           report)  # fmt: skip
    report.aggregates_rebuilt = rebuild_stale_aggregates(driver, database)
    return report


def rebuild_stale_aggregates(driver: Driver, database: str = "neo4j") -> list[str]:
    """Rebuild the aggregate layer of every Transcoder marked `aggregates_stale`, then clear the mark."""
    stale = [
        r["id"]
        for r in driver.execute_query(
            "MATCH (t:Transcoder) WHERE properties(t)['aggregates_stale'] RETURN t.id AS id ORDER BY id",
            database_=database,
        ).records
    ]
    for transcoder_id in stale:
        rebuild_aggregates(driver, database, transcoder=transcoder_id)
        driver.execute_query(
            "MATCH (t:Transcoder {id: $id}) REMOVE t.aggregates_stale", id=transcoder_id, database_=database
        )
    return stale
