"""Motifs (recurring paths) in Neo4j: reading prompts' graphs for the miner, and storing its per-prompt results.

    (:MotifRun {name: "motifs/<dictionary>", transcoder, min_strength, max_features, n_prompts, updated_at})
                                                                    the parameters of one dictionary's motifs
    (:Motif {key, transcoder, kind, nodes, source, end, n_nodes, support, total_strength, mean_strength})
        -[:HAS {pos}]->(:Feature | :Token)                          its nodes in path order
    (:Motif)-[:SEEN_IN {strength, n_paths, ingested_at}]->(:Prompt)                    one prompt's contribution
    (:Prompt {motifs_at})                                                              the prompt's `ingested_at`
                                                                                       when it was last mined

Scoped to one dictionary (`transcoder`, the id of `atlas.transcoders.identity`): a store may hold several
dictionaries side by side, whose prompts never share a feature, so every function here reads, mines, writes and
clears the prompts and motifs of one dictionary only. A motif's key names its features, and feature keys start with
their dictionary id, so the key already includes the dictionary (two dictionaries never share a motif); `transcoder`
is stored on the Motif and indexed so that scoped reads and deletes are index seeks.

Incremental by construction: the per-prompt contributions are stored (`SEEN_IN`), and a motif's `support`,
`total_strength` and `mean_strength` are sums over its `SEEN_IN` relationships. `motifs_at` is the prompt's own
`ingested_at` stamp when it was mined (kept by a re-ingest, which updates the Prompt in place), so an update finds
exactly (a) prompts never mined, (b) prompts re-ingested since (stamp differs: their old contributions are removed
first), (c) prompts deleted (the writer's `DETACH DELETE` of the Prompt
already removed their `SEEN_IN`); it mines only (a) and (b), then recomputes the sums of the motifs those prompts
touched and deletes motifs left without support. A full `mine` deletes the dictionary's motifs first. Both write each
batch of prompts in one transaction, and re-running either on an unchanged store changes nothing.

Alternative routes are motifs with the same (kind, source, end) and different intermediates: `source` and `end`
are indexed properties, so `MATCH (m:Motif {source: $s, end: $e}) RETURN m ORDER BY m.support DESC` lists them.
This module reads and writes; the mining itself is `atlas.analysis.motifs` (above storage: nothing here imports it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from neo4j import Driver, RoutingControl

from atlas.storage.graph_schema import ERROR_NODE, FEATURE_ACTIVATION, INPUT_TOKEN, LOGIT_TARGET

MOTIF, MOTIF_RUN, REL_HAS, REL_SEEN_IN = "Motif", "MotifRun", "HAS", "SEEN_IN"
RUN_NAME = "motifs"
SCHEMA = (
    "CREATE CONSTRAINT atlas_motif_key IF NOT EXISTS FOR (m:Motif) REQUIRE m.key IS UNIQUE",
    "CREATE CONSTRAINT atlas_motif_run_name IF NOT EXISTS FOR (r:MotifRun) REQUIRE r.name IS UNIQUE",
    "CREATE INDEX atlas_motif_route IF NOT EXISTS FOR (m:Motif) ON (m.source, m.end)",
    "CREATE INDEX atlas_motif_end IF NOT EXISTS FOR (m:Motif) ON (m.end)",
    "CREATE INDEX atlas_motif_transcoder IF NOT EXISTS FOR (m:Motif) ON (m.transcoder)",
)
_KINDS = {FEATURE_ACTIVATION: "feature", INPUT_TOKEN: "token", LOGIT_TARGET: "logit", ERROR_NODE: "error"}


class MotifStoreError(ValueError):
    """A request the motif store cannot answer (nothing mined, parameters that differ); nothing was changed."""


def ensure_motif_schema(driver: Driver, database: str) -> None:
    """Create the constraints and indexes, and adopt motifs mined before they were scoped to a dictionary."""
    for statement in SCHEMA:
        driver.execute_query(statement, database_=database)
    driver.execute_query("CALL db.awaitIndexes(300)", database_=database)
    adopt_unscoped(driver, database)


def adopt_unscoped(driver: Driver, database: str) -> None:
    """Give motifs of an older store (one store-wide run, no `transcoder`) their dictionary, exactly: a motif's
    dictionary is that of its features, and the old run's parameters held for every dictionary it mined."""

    def work(tx: Any) -> None:
        tx.run(
            "MATCH (m:Motif) WHERE m.transcoder IS NULL MATCH (m)-[:HAS]->(f:Feature) "
            "WITH m, min(f.transcoder) AS t SET m.transcoder = t"
        ).consume()
        tx.run(
            """
            MATCH (old:MotifRun {name: $name})
            MATCH (p:Prompt) WHERE p.motifs_at IS NOT NULL AND p.transcoder IS NOT NULL
            WITH old, p.transcoder AS t, count(p) AS n
            MERGE (r:MotifRun {name: $name + '/' + t})
            ON CREATE SET r.transcoder = t, r.min_strength = old.min_strength, r.max_features = old.max_features,
                r.updated_at = old.updated_at, r.n_prompts = n
            """,
            name=RUN_NAME,
        ).consume()
        tx.run("MATCH (old:MotifRun {name: $name}) DELETE old", name=RUN_NAME).consume()

    with driver.session(database=database) as session:
        session.execute_write(work)


def run_name(transcoder: str) -> str:
    """The MotifRun of one dictionary's motifs."""
    return f"{RUN_NAME}/{transcoder}"


def stored_dictionaries(driver: Driver, database: str) -> dict[str, int]:
    """Dictionary id → number of stored prompts attributed with it."""
    records = driver.execute_query(
        "MATCH (p:Prompt) WHERE p.transcoder IS NOT NULL RETURN p.transcoder AS t, count(p) AS n ORDER BY t",
        database_=database, routing_=RoutingControl.READ,
    ).records  # fmt: skip
    return {r["t"]: int(r["n"]) for r in records}


def resolve_dictionary(driver: Driver, database: str, transcoder: str | None) -> str:
    """The dictionary to work on: `transcoder` when it has stored prompts, else (None) the store's only dictionary;
    a MotifStoreError naming the stored dictionaries otherwise (an empty store, an unknown id, or several)."""
    stored = stored_dictionaries(driver, database)
    listing = ", ".join(f"{t} ({n} prompts)" for t, n in stored.items()) or "none"
    if transcoder is not None:
        if transcoder not in stored:
            raise MotifStoreError(
                f"the store holds no prompts of dictionary {transcoder!r} (stored dictionaries: {listing}); ingest"
                " some first (`atlas ingest` or `atlas demo`)"
            )
        return transcoder
    if not stored:
        raise MotifStoreError("the store holds no prompts; ingest some first (`atlas ingest` or `atlas demo`)")
    if len(stored) > 1:
        raise MotifStoreError(
            f"the store holds {len(stored)} dictionaries: {listing}; choose one with --transcoders DIR or"
            " --dictionary ID"
        )
    return next(iter(stored))


def prompt_stamps(driver: Driver, database: str, transcoder: str) -> dict[str, str]:
    """Every stored prompt of dictionary `transcoder`: its id → its `ingested_at` stamp (ISO text)."""
    records = driver.execute_query(
        "MATCH (p:Prompt {transcoder: $t}) RETURN p.id AS id, toString(p.ingested_at) AS at", t=transcoder,
        database_=database,
    ).records  # fmt: skip
    return {r["id"]: r["at"] for r in records}


def mined_stamps(driver: Driver, database: str, transcoder: str) -> dict[str, str]:
    """Prompt id → the stamp it was mined at (`Prompt.motifs_at`), for every mined prompt of `transcoder` (with or
    without paths)."""
    records = driver.execute_query(
        "MATCH (p:Prompt {transcoder: $t}) WHERE p.motifs_at IS NOT NULL RETURN p.id AS id, p.motifs_at AS at",
        t=transcoder, database_=database,
    ).records  # fmt: skip
    return {r["id"]: r["at"] for r in records}


def read_prompt_graphs(driver: Driver, database: str, prompt_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The graphs of `prompt_ids` as plain dicts: prompt_id, kinds, keys, probability (by node_index), edges."""
    out = []
    with driver.session(database=database) as session:
        for pid in prompt_ids:
            nodes = session.run(
                "MATCH (n:Instance) WHERE n.prompt_id = $p AND n.node_index IS NOT NULL OPTIONAL MATCH (n)-[:OF]->(x) "
                "RETURN n.node_index AS i, labels(n) AS labels, x.key AS key, n.probability AS probability "
                "ORDER BY i",
                p=pid,
            ).data()
            edges = session.run(
                "MATCH (a:Instance)-[e:EDGE]->(b) WHERE a.prompt_id = $p AND a.node_index IS NOT NULL "
                "RETURN a.node_index AS s, b.node_index AS t, e.weight AS w",
                p=pid,
            ).data()
            position = {row["i"]: k for k, row in enumerate(nodes)}
            kinds = [next((_KINDS[label] for label in row["labels"] if label in _KINDS), "error") for row in nodes]
            out.append(
                {
                    "prompt_id": pid,
                    "kinds": kinds,
                    "keys": [row["key"] for row in nodes],
                    "probability": [float(row["probability"] or 0.0) for row in nodes],
                    "edges": [(position[e["s"]], position[e["t"]], float(e["w"])) for e in edges],
                }
            )
    return out


def motif_run(driver: Driver, database: str, transcoder: str) -> dict[str, Any] | None:
    records = driver.execute_query(
        "MATCH (r:MotifRun {name: $name}) RETURN properties(r) AS r",
        name=run_name(transcoder),
        database_=database,
        routing_=RoutingControl.READ,
    ).records
    return dict(records[0]["r"]) if records else None


def clear_motifs(driver: Driver, database: str, transcoder: str, batch: int = 5000) -> None:
    """Delete the Motifs of dictionary `transcoder` (and so their HAS / SEEN_IN), its run record and its prompts'
    `motifs_at`."""
    while True:
        summary = driver.execute_query(
            "MATCH (m:Motif {transcoder: $t}) WITH m LIMIT $n DETACH DELETE m", t=transcoder, n=batch,
            database_=database,
        ).summary  # fmt: skip
        if summary.counters.nodes_deleted == 0:
            break
    driver.execute_query("MATCH (r:MotifRun {name: $name}) DELETE r", name=run_name(transcoder), database_=database)
    driver.execute_query("MATCH (p:Prompt {transcoder: $t}) WHERE p.motifs_at IS NOT NULL REMOVE p.motifs_at",
                         t=transcoder, database_=database)  # fmt: skip


def write_contributions(
    driver: Driver,
    database: str,
    contributions: Mapping[str, Iterable[Mapping[str, Any]]],
    stamps: Mapping[str, str],
    *,
    transcoder: str,
    min_strength: float,
    max_features: int,
) -> set[str]:
    """Replace the contributions of the prompts in `contributions` (prompt id → rows {key, kind, nodes, strength,
    n_paths}), all prompts of dictionary `transcoder`, and refresh the sums of every motif they touched, in one
    transaction; returns the touched motif keys.

    Also records the run's parameters. Motifs left without support are deleted.
    """
    rows = [
        {"pid": pid, "at": stamps[pid], "key": r["key"], "kind": r["kind"], "nodes": list(r["nodes"]),
         "strength": float(r["strength"]), "n_paths": int(r["n_paths"])}
        for pid, prompt_rows in contributions.items() for r in prompt_rows
    ]  # fmt: skip

    def work(tx: Any) -> set[str]:
        old = tx.run(
            "UNWIND $pids AS pid MATCH (m:Motif)-[s:SEEN_IN]->(:Prompt {id: pid}) DELETE s RETURN DISTINCT m.key AS k",
            pids=list(contributions),
        ).data()
        touched = {r["k"] for r in old} | {r["key"] for r in rows}
        for start in range(0, len(rows), 2000):
            tx.run(
                """
                UNWIND $rows AS r
                MATCH (p:Prompt {id: r.pid}) WHERE p.transcoder = $t
                MERGE (m:Motif {key: r.key})
                ON CREATE SET m.transcoder = $t, m.kind = r.kind, m.nodes = r.nodes, m.source = r.nodes[0],
                              m.end = last(r.nodes), m.n_nodes = size(r.nodes)
                CREATE (m)-[:SEEN_IN {strength: r.strength, n_paths: r.n_paths, ingested_at: r.at}]->(p)
                """,
                rows=rows[start : start + 2000],
                t=transcoder,
            ).consume()
        refresh_sums(tx, sorted(touched))
        tx.run(
            "UNWIND $pids AS pid MATCH (p:Prompt {id: pid}) SET p.motifs_at = $at[pid]",
            pids=list(contributions),
            at={pid: stamps[pid] for pid in contributions},
        ).consume()
        tx.run(
            "MERGE (r:MotifRun {name: $name}) SET r.transcoder = $t, r.min_strength = $s, r.max_features = $f, "
            "r.updated_at = $now",
            name=run_name(transcoder), t=transcoder, s=min_strength, f=max_features,
            now=datetime.now(UTC).isoformat(timespec="seconds"),
        ).consume()  # fmt: skip
        return touched

    with driver.session(database=database) as session:
        touched: set[str] = session.execute_write(work)
    return touched


def refresh_sums(tx: Any, keys: Sequence[str]) -> None:
    """Recompute support and strengths of `keys` from their SEEN_IN; link new motifs to their nodes; delete the
    unsupported."""
    for start in range(0, len(keys), 2000):
        chunk = list(keys[start : start + 2000])
        tx.run(
            """
            UNWIND $keys AS k MATCH (m:Motif {key: k})
            OPTIONAL MATCH (m)-[s:SEEN_IN]->(:Prompt)
            WITH m, count(s) AS n, coalesce(sum(s.strength), 0.0) AS total
            SET m.support = n, m.total_strength = total, m.mean_strength = CASE n WHEN 0 THEN 0.0 ELSE total / n END
            """,
            keys=chunk,
        ).consume()
        tx.run(
            """
            UNWIND $keys AS k MATCH (m:Motif {key: k}) WHERE NOT (m)-[:HAS]->()
            UNWIND range(0, size(m.nodes) - 1) AS i
            OPTIONAL MATCH (f:Feature {key: m.nodes[i]})
            OPTIONAL MATCH (t:Token {key: m.nodes[i]})
            WITH m, i, coalesce(f, t) AS x WHERE x IS NOT NULL
            CREATE (m)-[:HAS {pos: i}]->(x)
            """,
            keys=chunk,
        ).consume()
        tx.run("UNWIND $keys AS k MATCH (m:Motif {key: k}) WHERE m.support = 0 DETACH DELETE m", keys=chunk).consume()


def refresh_orphans(driver: Driver, database: str, transcoder: str) -> int:
    """Recompute every motif of `transcoder` whose stored support no longer matches its SEEN_IN (prompts deleted);
    returns how many."""

    def work(tx: Any) -> int:
        stale = tx.run(
            "MATCH (m:Motif {transcoder: $t}) WHERE m.support <> COUNT { (m)-[:SEEN_IN]->() } RETURN m.key AS k",
            t=transcoder,
        ).data()
        refresh_sums(tx, [r["k"] for r in stale])
        return len(stale)

    with driver.session(database=database) as session:
        return int(session.execute_write(work))


def set_run_prompts(driver: Driver, database: str, transcoder: str) -> int:
    """Record on the dictionary's run how many of its prompts are mined; returns it."""
    records = driver.execute_query(
        "MATCH (r:MotifRun {name: $name}) SET r.n_prompts = COUNT { MATCH (p:Prompt {transcoder: $t}) } "
        "RETURN r.n_prompts AS n",
        name=run_name(transcoder), t=transcoder, database_=database,
    ).records  # fmt: skip
    return int(records[0]["n"]) if records else 0


def list_motifs(
    driver: Driver, database: str, transcoder: str, *, kind: str | None = None, min_support: int = 1, limit: int = 20,
    feature: str | None = None, order: str = "total",
) -> list[dict[str, Any]]:  # fmt: skip
    """Stored motifs of dictionary `transcoder`, strongest total (or most supported) first; optionally only those
    through `feature` (a key)."""
    if order not in ("total", "support"):
        raise MotifStoreError(f"order must be total or support, got {order!r}")
    sort = "m.total_strength DESC, m.key" if order == "total" else "m.support DESC, m.mean_strength DESC, m.key"
    anchor = "MATCH (m:Motif)-[:HAS]->(:Feature {key: $feature})" if feature else "MATCH (m:Motif)"
    records = driver.execute_query(
        f"{anchor} WHERE m.transcoder = $t AND ($kind IS NULL OR m.kind = $kind) AND m.support >= $min_support "
        "OPTIONAL MATCH (o:Motif {source: m.source, end: m.end, kind: m.kind, transcoder: $t}) WHERE o <> m "
        "WITH m, count(o) AS alternatives "
        f"RETURN m.key AS key, m.kind AS kind, m.nodes AS nodes, m.support AS support, m.total_strength AS total, "
        f"m.mean_strength AS mean, alternatives ORDER BY {sort} LIMIT $limit",
        t=transcoder, kind=kind, min_support=min_support, limit=limit, feature=feature, database_=database,
        routing_=RoutingControl.READ,
    ).records  # fmt: skip
    return [dict(r) for r in records]


def motif_contributions(driver: Driver, database: str, transcoder: str) -> dict[str, list[dict[str, Any]]]:
    """Every stored contribution of dictionary `transcoder`, by prompt: {prompt id: [{key, kind, nodes, strength,
    n_paths}]} (for the miner's alternatives and the clusters' summaries)."""
    records = driver.execute_query(
        "MATCH (m:Motif {transcoder: $t})-[s:SEEN_IN]->(p:Prompt) RETURN p.id AS pid, m.key AS key, m.kind AS kind, "
        "m.nodes AS nodes, s.strength AS strength, s.n_paths AS n_paths ORDER BY pid, key",
        t=transcoder,
        database_=database,
        routing_=RoutingControl.READ,
    ).records
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["pid"], []).append(
            {"key": r["key"], "kind": r["kind"], "nodes": tuple(r["nodes"]), "strength": r["strength"],
             "n_paths": r["n_paths"]}
        )  # fmt: skip
    return out
