"""Prompt clusters in Neo4j: stored, replaced as a whole, and read back.

    (:ClusterRun {name: "clusters/<dictionary>", transcoder, eps, min_samples, n_neighbours, n_prompts, n_clusters,
                  n_unclustered, candidate_pairs, updated_at})
    (:Cluster {key, transcoder, index, size, cohesion, features, motifs})-[:CONTAINS]->(:Prompt)
    (:Cluster)-[:CHARACTERISED_BY {rank, score}]->(:Feature | :Motif)

A clustering belongs to one dictionary (`transcoder`): prompts of different dictionaries share no feature, so they
are never clustered together, and each dictionary of the store keeps its own clusters. `key` is
"{transcoder}/cluster-{index}", index 0 the largest cluster; `features` / `motifs` repeat the characteristic keys in
rank order for readers without a second hop. Writing deletes the dictionary's Clusters and run record and creates the
new ones in one transaction, so a reader sees the old or the new clustering, and a re-run on an unchanged store stores
the same. Clusters of an older store (no `transcoder`, possibly mixing dictionaries) are deleted by the next build.
This module stores and reads; the clustering is `atlas.analysis.clusters`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from neo4j import Driver, RoutingControl

CLUSTER, CLUSTER_RUN, REL_CONTAINS, REL_CHARACTERISED_BY = "Cluster", "ClusterRun", "CONTAINS", "CHARACTERISED_BY"
RUN_NAME = "clusters"
SCHEMA = (
    "CREATE CONSTRAINT atlas_cluster_key IF NOT EXISTS FOR (c:Cluster) REQUIRE c.key IS UNIQUE",
    "CREATE CONSTRAINT atlas_cluster_run_name IF NOT EXISTS FOR (r:ClusterRun) REQUIRE r.name IS UNIQUE",
    "CREATE INDEX atlas_cluster_transcoder IF NOT EXISTS FOR (c:Cluster) ON (c.transcoder)",
)


class ClusterStoreError(ValueError):
    """A request the cluster store cannot answer (nothing clustered); nothing was changed."""


def run_name(transcoder: str) -> str:
    """The ClusterRun of one dictionary's clusters."""
    return f"{RUN_NAME}/{transcoder}"


def replace_clusters(
    driver: Driver, database: str, transcoder: str, clusters: Sequence[Mapping[str, Any]], run: Mapping[str, Any]
) -> int:
    """Replace the Clusters of dictionary `transcoder` by `clusters` (dicts: index, prompt_ids (of that dictionary),
    features [(key, score)], motifs [(key, score)], cohesion) and its run record by `run`; returns the clusters
    written."""
    for statement in SCHEMA:
        driver.execute_query(statement, database_=database)
    rows = [
        {"key": f"{transcoder}/cluster-{c['index']}", "index": c["index"], "size": len(c["prompt_ids"]),
         "prompts": c["prompt_ids"], "cohesion": c["cohesion"], "features": [k for k, _ in c["features"]],
         "motifs": [k for k, _ in c["motifs"]], "fscores": [s for _, s in c["features"]],
         "mscores": [s for _, s in c["motifs"]]}
        for c in clusters
    ]  # fmt: skip

    def work(tx: Any) -> int:
        tx.run("MATCH (c:Cluster {transcoder: $t}) DETACH DELETE c", t=transcoder).consume()
        tx.run("MATCH (c:Cluster) WHERE c.transcoder IS NULL DETACH DELETE c").consume()  # unscoped: older store
        tx.run("MATCH (r:ClusterRun) WHERE r.name IN [$old, $name] DELETE r", old=RUN_NAME,
               name=run_name(transcoder)).consume()  # fmt: skip
        tx.run(
            """
            UNWIND $rows AS r
            CREATE (c:Cluster {key: r.key, transcoder: $t, index: r.index, size: r.size, cohesion: r.cohesion,
                               features: r.features, motifs: r.motifs})
            WITH c, r
            CALL (c, r) {
              UNWIND r.prompts AS pid MATCH (p:Prompt {id: pid}) WHERE p.transcoder = $t
              CREATE (c)-[:CONTAINS]->(p)
            }
            CALL (c, r) {
              UNWIND range(0, size(r.features) - 1) AS i MATCH (f:Feature {key: r.features[i]})
              CREATE (c)-[:CHARACTERISED_BY {rank: i, score: r.fscores[i]}]->(f)
            }
            CALL (c, r) {
              UNWIND range(0, size(r.motifs) - 1) AS i MATCH (m:Motif {key: r.motifs[i], transcoder: $t})
              CREATE (c)-[:CHARACTERISED_BY {rank: i, score: r.mscores[i]}]->(m)
            }
            """,
            rows=rows,
            t=transcoder,
        ).consume()
        tx.run(
            "CREATE (r:ClusterRun {name: $name}) SET r += $props, r.transcoder = $t, r.updated_at = $now",
            name=run_name(transcoder), t=transcoder, props=dict(run),
            now=datetime.now(UTC).isoformat(timespec="seconds"),
        ).consume()  # fmt: skip
        return len(rows)

    with driver.session(database=database) as session:
        return int(session.execute_write(work))


def cluster_run(driver: Driver, database: str, transcoder: str) -> dict[str, Any] | None:
    records = driver.execute_query(
        "MATCH (r:ClusterRun {name: $name}) RETURN properties(r) AS r",
        name=run_name(transcoder),
        database_=database,
        routing_=RoutingControl.READ,
    ).records
    return dict(records[0]["r"]) if records else None


def list_clusters(
    driver: Driver, database: str, transcoder: str, *, limit: int = 20, prompts: int = 5
) -> list[dict[str, Any]]:
    """Stored clusters of dictionary `transcoder`, largest first, with up to `prompts` member prompt texts each."""
    if cluster_run(driver, database, transcoder) is None:
        raise ClusterStoreError(f"no clusters stored for {transcoder}; run `atlas global clusters build` first")
    records = driver.execute_query(
        "MATCH (c:Cluster {transcoder: $t}) WITH c ORDER BY c.index LIMIT $limit "
        "OPTIONAL MATCH (c)-[:CONTAINS]->(p:Prompt) WITH c, p ORDER BY p.id "
        "RETURN c.key AS key, c.index AS index, c.size AS size, c.cohesion AS cohesion, c.features AS features, "
        "c.motifs AS motifs, collect(p.id)[..$n] AS prompt_ids, collect(p.text)[..$n] AS texts, "
        "collect(DISTINCT p.task) AS tasks ORDER BY index",
        t=transcoder, limit=limit, n=prompts, database_=database, routing_=RoutingControl.READ,
    ).records  # fmt: skip
    return [dict(r) for r in records]
