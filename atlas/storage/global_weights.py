"""Global weights in the DuckDB statistics database: one table of top-k partners, replaced per (dictionary, norm).

Tables (in the same file as the feature statistics, written by snapshot swap like them):
- `global_weights (transcoder_id, norm, relation, layer, feature, rank, partner_layer, partner, v, twera, era)`:
  `relation` is `feature_out` (partner a later feature), `feature_in` (an earlier feature), `token_in` (a token id
  whose embedding reads into the feature) or `logit_out` (a vocabulary id); `partner_layer` is NULL for tokens and
  logits; `rank` 0 is the largest |v|. `twera` / `era` are NULL until co-activation statistics fill them.
- `global_weight_runs (transcoder_id, norm, model, k, n_layers, n_features)`: what produced the rows.

Writing replaces every row of the same (transcoder_id, norm) in one snapshot, so a re-run stores the same result
and a failure (bad table, crash) leaves the live file as it was. Optionally the `feature_out` rows also go to Neo4j as
`(:Feature)-[:GLOBAL_WEIGHT {norm, rank, v, twera, era}]->(:Feature)` between Features already stored, replaced
per (dictionary, norm) in one transaction. This module stores and reads; it computes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from atlas.storage.feature_stats import FeatureStatsStore

RELATIONS = ("feature_out", "feature_in", "token_in", "logit_out")
GLOBAL_WEIGHTS_SCHEMA = pa.schema(
    [
        ("transcoder_id", pa.string()), ("norm", pa.string()), ("relation", pa.string()), ("layer", pa.int32()),
        ("feature", pa.int32()), ("rank", pa.int32()), ("partner_layer", pa.int32()), ("partner", pa.int64()),
        ("v", pa.float64()), ("twera", pa.float64()), ("era", pa.float64()),
    ]
)  # fmt: skip
_CREATE = """
CREATE TABLE IF NOT EXISTS global_weights (transcoder_id VARCHAR, norm VARCHAR, relation VARCHAR, layer INTEGER,
  feature INTEGER, rank INTEGER, partner_layer INTEGER, partner BIGINT, v DOUBLE, twera DOUBLE, era DOUBLE);
CREATE TABLE IF NOT EXISTS global_weight_runs (transcoder_id VARCHAR, norm VARCHAR, model VARCHAR, k INTEGER,
  n_layers INTEGER, n_features INTEGER);
"""


class GlobalWeightsStoreError(ValueError):
    """Rows that cannot be stored, or a lookup the store cannot answer; nothing was changed."""


def replace_global_weights(
    path: str | Path, table: pa.Table, *, transcoder_id: str, norm: str, model: str, k: int, n_layers: int,
    n_features: int,
) -> int:  # fmt: skip
    """Store `table` (`GLOBAL_WEIGHTS_SCHEMA`) as the global weights of (transcoder_id, norm); returns its rows."""
    if not table.schema.equals(GLOBAL_WEIGHTS_SCHEMA, check_metadata=False):
        raise GlobalWeightsStoreError(f"global weights table has schema {table.schema}, not {GLOBAL_WEIGHTS_SCHEMA}")
    for column, expected in (("transcoder_id", transcoder_id), ("norm", norm)):
        values = set(table.column(column).to_pylist())
        if values - {expected}:
            raise GlobalWeightsStoreError(f"rows with {column} {sorted(values - {expected})}, expected {expected!r}")
    unknown = set(table.column("relation").to_pylist()) - set(RELATIONS)
    if unknown:
        raise GlobalWeightsStoreError(f"unknown relations {sorted(unknown)}; expected {RELATIONS}")
    store = FeatureStatsStore(path)
    store.path.parent.mkdir(parents=True, exist_ok=True)
    with store.snapshot() as con:
        con.execute(_CREATE)
        key = [transcoder_id, norm]
        con.execute("DELETE FROM global_weights WHERE transcoder_id = ? AND norm = ?", key)
        con.execute("DELETE FROM global_weight_runs WHERE transcoder_id = ? AND norm = ?", key)
        con.register("incoming", table)
        con.execute("INSERT INTO global_weights SELECT * FROM incoming ORDER BY relation, layer, feature, rank")
        con.unregister("incoming")
        con.execute("INSERT INTO global_weight_runs VALUES (?, ?, ?, ?, ?, ?)", [*key, model, k, n_layers, n_features])
    return table.num_rows


def global_weight_run(path: str | Path, transcoder_id: str, norm: str = "fold") -> dict[str, Any]:
    """The stored run of (transcoder_id, norm); a clear error when the store or the run does not exist."""
    if not Path(path).exists():
        raise GlobalWeightsStoreError(f"no statistics database at {path}; run `atlas global weights` first")
    with duckdb.connect(str(path), read_only=True) as con:
        tables = {row[0] for row in con.execute("SHOW TABLES").fetchall()}
        row = (
            con.execute(
                "SELECT model, k, n_layers, n_features FROM global_weight_runs WHERE transcoder_id = ? AND norm = ?",
                [transcoder_id, norm],
            ).fetchone()
            if "global_weight_runs" in tables
            else None
        )
    if row is None:
        raise GlobalWeightsStoreError(
            f"{path} holds no global weights of {transcoder_id} (norm {norm}); run `atlas global weights` first"
        )
    return dict(zip(("model", "k", "n_layers", "n_features"), row, strict=True))


def read_global_weights(
    path: str | Path, transcoder_id: str, layer: int, feature: int, *, norm: str = "fold", relation: str | None = None
) -> list[dict[str, Any]]:
    """One feature's stored rows, by relation then rank; unknown features and missing runs are clear errors."""
    run = global_weight_run(path, transcoder_id, norm)
    if not (0 <= layer < run["n_layers"] and 0 <= feature < run["n_features"]):
        raise GlobalWeightsStoreError(
            f"no feature ({layer}, {feature}) in {transcoder_id}: {run['n_layers']} layers × {run['n_features']}"
        )
    if relation is not None and relation not in RELATIONS:
        raise GlobalWeightsStoreError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    with duckdb.connect(str(path), read_only=True) as con:
        cursor = con.execute(
            "SELECT relation, rank, partner_layer, partner, v, twera, era FROM global_weights WHERE transcoder_id = ?"
            " AND norm = ? AND layer = ? AND feature = ? AND (? IS NULL OR relation = ?) ORDER BY relation, rank",
            [transcoder_id, norm, layer, feature, relation, relation],
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


ACTIVITY_SCHEMA = pa.schema(
    [("source_layer", pa.int32()), ("source", pa.int64()), ("target_layer", pa.int32()), ("target", pa.int64()),
     ("twera", pa.float64()), ("era", pa.float64())]
)  # fmt: skip


def stored_pairs(path: str | Path, transcoder_id: str, norm: str = "fold") -> pa.Table:
    """Distinct feature pairs `(source_layer, source, target_layer, target, v, twera)` of the stored feature rows."""
    global_weight_run(path, transcoder_id, norm)  # a clear error when there is nothing stored
    with duckdb.connect(str(path), read_only=True) as con:
        return con.sql(
            """
            SELECT DISTINCT source_layer, source, target_layer, target, v, twera FROM (
              SELECT layer AS source_layer, feature::BIGINT AS source, partner_layer AS target_layer,
                     partner AS target, v, twera
              FROM global_weights WHERE transcoder_id = ? AND norm = ? AND relation = 'feature_out'
              UNION ALL
              SELECT partner_layer, partner, layer, feature::BIGINT, v, twera
              FROM global_weights WHERE transcoder_id = ? AND norm = ? AND relation = 'feature_in')
            ORDER BY ALL
            """,
            params=[transcoder_id, norm, transcoder_id, norm],
        ).to_arrow_table()


def write_activity(
    path: str | Path, table: pa.Table, *, transcoder_id: str, norm: str, corpus: str, n_tokens: int
) -> None:
    """Set `twera` / `era` of every stored feature row from `table` (`ACTIVITY_SCHEMA`, one row per pair).

    Replaces the previous activity of (transcoder_id, norm) in one snapshot: rows of pairs not in `table` go back to
    NULL, and `global_activity_runs` records the corpus and its token count.
    """
    if not table.schema.equals(ACTIVITY_SCHEMA, check_metadata=False):
        raise GlobalWeightsStoreError(f"activity table has schema {table.schema}, not {ACTIVITY_SCHEMA}")
    global_weight_run(path, transcoder_id, norm)
    with FeatureStatsStore(path).snapshot() as con:
        key = [transcoder_id, norm]
        con.execute("UPDATE global_weights SET twera = NULL, era = NULL WHERE transcoder_id = ? AND norm = ?", key)
        con.register("activity", table)
        con.execute(
            "UPDATE global_weights g SET twera = a.twera, era = a.era FROM activity a WHERE g.transcoder_id = ? AND"
            " g.norm = ? AND g.relation = 'feature_out' AND g.layer = a.source_layer AND g.feature = a.source AND"
            " g.partner_layer = a.target_layer AND g.partner = a.target",
            key,
        )
        con.execute(
            "UPDATE global_weights g SET twera = a.twera, era = a.era FROM activity a WHERE g.transcoder_id = ? AND"
            " g.norm = ? AND g.relation = 'feature_in' AND g.layer = a.target_layer AND g.feature = a.target AND"
            " g.partner_layer = a.source_layer AND g.partner = a.source",
            key,
        )
        con.unregister("activity")
        con.execute("CREATE TABLE IF NOT EXISTS global_activity_runs (transcoder_id VARCHAR, norm VARCHAR,"
                    " corpus VARCHAR, n_tokens BIGINT)")  # fmt: skip
        con.execute("DELETE FROM global_activity_runs WHERE transcoder_id = ? AND norm = ?", key)
        con.execute("INSERT INTO global_activity_runs VALUES (?, ?, ?, ?)", [*key, corpus, n_tokens])


REL_GLOBAL_WEIGHT = "GLOBAL_WEIGHT"


def feature_rows(path: str | Path, transcoder_id: str, norm: str = "fold") -> list[dict[str, Any]]:
    """The stored `feature_out` rows of (transcoder_id, norm): layer, feature, rank, partner_layer, partner, v, twera,
    era."""
    global_weight_run(path, transcoder_id, norm)
    with duckdb.connect(str(path), read_only=True) as con:
        cursor = con.execute(
            "SELECT layer, feature, rank, partner_layer, partner, v, twera, era FROM global_weights WHERE"
            " transcoder_id = ? AND norm = ? AND relation = 'feature_out' ORDER BY layer, feature, rank",
            [transcoder_id, norm],
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def write_global_weight_relationships(
    driver: Any, rows: list[dict[str, Any]], *, transcoder_id: str, norm: str, database: str = "neo4j",
    batch: int = 5000,
) -> int:  # fmt: skip
    """Replace `(:Feature)-[:GLOBAL_WEIGHT {norm, rank, v, twera, era}]->(:Feature)` of (transcoder_id, norm) by
    `rows` (`feature_rows`), in one transaction; returns the relationships created.

    Only Features already in the store (active in some stored prompt) are connected: no Feature node is created, so
    pairs with an endpoint never seen in a prompt are left out. A re-run gives the same relationships.
    """
    from atlas.attribution.graph import feature_key

    records = [
        {"s": feature_key(transcoder_id, r["layer"], r["feature"]),
         "t": feature_key(transcoder_id, r["partner_layer"], r["partner"]),
         "rank": r["rank"], "v": r["v"], "twera": r["twera"], "era": r["era"]}
        for r in rows
    ]  # fmt: skip

    def work(tx: Any) -> int:
        tx.run(
            f"MATCH (f:Feature {{transcoder: $tc}})-[g:{REL_GLOBAL_WEIGHT} {{norm: $norm}}]->() DELETE g",
            tc=transcoder_id, norm=norm,
        ).consume()  # fmt: skip
        created = 0
        for start in range(0, len(records), batch):
            result = tx.run(
                f"UNWIND $rows AS r MATCH (f:Feature {{key: r.s}}) MATCH (t:Feature {{key: r.t}}) "
                f"CREATE (f)-[:{REL_GLOBAL_WEIGHT} {{norm: $norm, rank: r.rank, v: r.v, twera: r.twera, "
                f"era: r.era}}]->(t) RETURN count(*) AS n",
                rows=records[start : start + batch], norm=norm,
            )  # fmt: skip
            created += int(result.single()["n"])
        return created

    with driver.session(database=database) as session:
        return int(session.execute_write(work))
