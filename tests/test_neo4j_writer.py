"""GraphWriter against a real Neo4j (fixtures in `neo4j_fixtures`; no mocks).

Every test writes under its own prompt ids, transcoder and model names (a fresh uuid), compares store counts as
differences, and deletes what it wrote, so the tests share the session server without seeing each other.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from neo4j import Driver
from neo4j.exceptions import ServiceUnavailable

from atlas.attribution.graph import EDGE_SCHEMA, NODE_SCHEMA, feature_key
from atlas.storage.aggregate import (
    AggregateBacklogError,
    BackgroundAggregator,
    aggregate_rows,
    node_hash,
    pair_key,
    rebuild_aggregates,
    update_for_prompts,
)
from atlas.storage.graph_schema import (
    RANGE_INDEXES,
    RELATIONSHIP_INDEXES,
    SCHEMA_VERSION,
    UNIQUE_KEYS,
    read_schema_version,
)
from atlas.storage.migrations import SchemaVersionError, ensure_schema
from atlas.storage.neo4j_server import Neo4jConnection
from atlas.storage.neo4j_writer import GraphValidationError, GraphWriter, StoreCounts

Graph = tuple[dict[str, Any], pa.Table, pa.Table]


@dataclass
class Names:
    """Unique names for one test; `prompt(...)` registers prompt ids for cleanup."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    prompts: list[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        return f"test-model-{self.tag}"

    @property
    def transcoder(self) -> str:
        return f"test/clt-{self.tag}"  # a '/' inside the id, as in hub-style names

    def prompt(self, name: str) -> str:
        pid = f"test-{self.tag}-{name}"
        self.prompts.append(pid)
        return pid


def make_graph(
    names: Names,
    prompt_id: str,
    *,
    features: Sequence[tuple[int, int, int, float]] = ((0, 0, 7, 1.5), (1, 1, 3, 0.25), (1, 2, 7, 2.0)),
    errors: Sequence[tuple[int, int, float]] = ((0, 1, 0.5), (1, 2, 0.75)),
    tokens: Sequence[int] = (101, 202, 303),
    logits: Sequence[tuple[int | None, str, float, float]] = (
        (404, " Paris", 0.75, 3.5),
        (None, "direction", 0.25, 1.0),
    ),
    edges: Sequence[tuple[int, int, float]] | None = None,
) -> Graph:
    """A prompt graph in NODE_SCHEMA / EDGE_SCHEMA; rows in NodeIndex order (features, errors, tokens, logits).

    `features`: (layer, position, feature, activation); `errors`: (layer, position, norm); `tokens`: token ids at
    positions 0..; `logits`: (token_id or None for a custom direction, label, probability, logit value);
    `edges`: (source node_index, target node_index, weight), default: a small DAG over all nodes.
    """
    rows: dict[str, list[Any]] = {name: [] for name in NODE_SCHEMA.names}

    def add(kind: str, node_id: str, position: int, **values: Any) -> None:
        i = len(rows["node_index"])
        rows["prompt_id"].append(prompt_id)
        rows["node_index"].append(i)
        rows["node_id"].append(node_id)
        rows["kind"].append(kind)
        rows["position"].append(position)
        for name in ("layer", "feature", "feature_key", "token_id", "token", "activation", "probability"):
            rows[name].append(values.get(name))
        rows["influence"].append(None if i % 3 == 2 else 0.125 * i)  # some nulls

    for layer, pos, feat, act in features:
        add("feature", f"{layer}_{feat}_{pos}", pos, layer=layer, feature=feat,
            feature_key=feature_key(names.transcoder, layer, feat), activation=act)  # fmt: skip
    for layer, pos, norm in errors:
        add("error", f"{layer}_-1_{pos}", pos, layer=layer, activation=norm)
    for pos, tid in enumerate(tokens):
        add("token", f"E_{tid}_{pos}", pos, token_id=tid, token=f"tok{tid}")
    last = max(len(tokens) - 1, 0)
    for target, label, prob, logit in logits:
        add("logit", f"L_{target}_{last}", last, token_id=target, token=label, probability=prob, activation=logit)
    nodes = pa.Table.from_pydict(rows, schema=NODE_SCHEMA)
    n = nodes.num_rows
    if edges is None:
        edges = [(s, t, 0.5 - 0.03125 * (s * n + t)) for s in range(n) for t in range(s + 1, min(n, s + 4))]
    edge_table = pa.Table.from_pydict(
        {
            "prompt_id": [prompt_id] * len(edges),
            "source": [e[0] for e in edges],
            "target": [e[1] for e in edges],
            "weight": [e[2] for e in edges],
        },
        schema=EDGE_SCHEMA,
    )
    meta = {
        "id": prompt_id,
        "text": "tok101 tok202 tok303",
        "tokens": list(tokens),
        "model": names.model,
        "transcoder": names.transcoder,
        "run": f"run-{names.tag}",
        "replacement_score": 0.5,
        "completeness_score": 0.75,
        "created_at": "2026-01-01T00:00:00Z",
    }
    return meta, nodes, edge_table


def snapshot(driver: Driver, database: str, prompt_id: str) -> dict[str, Any]:
    """Everything stored for a prompt (instance nodes with labels, OF targets, edges, Prompt properties)."""
    nodes = driver.execute_query(
        """
        MATCH (n:Instance) WHERE n.prompt_id = $pid AND n.node_index IS NOT NULL
        OPTIONAL MATCH (n)-[:OF]->(x)
        OPTIONAL MATCH (n)-[:IN]->(p:Prompt)
        RETURN n.node_index AS i, labels(n) AS labels, properties(n) AS props,
               collect(DISTINCT coalesce(x.key, '')) AS of, collect(DISTINCT p.id) AS prompts
        ORDER BY i
        """,
        pid=prompt_id,
        database_=database,
    ).records
    edges = driver.execute_query(
        """
        MATCH (a:Instance)-[e:EDGE]->(b:Instance) WHERE a.prompt_id = $pid AND a.node_index IS NOT NULL
        RETURN a.node_index AS s, b.node_index AS t, b.prompt_id AS tp, e.weight AS w ORDER BY s, t
        """,
        pid=prompt_id,
        database_=database,
    ).records
    prompt = driver.execute_query(
        "MATCH (p:Prompt {id: $pid}) RETURN properties(p) AS props", pid=prompt_id, database_=database
    ).records
    props = dict(prompt[0]["props"]) if prompt else None
    if props is not None:
        props.pop("ingested_at")
    return {
        "nodes": [(r["i"], sorted(r["labels"]), dict(r["props"]), sorted(r["of"]), r["prompts"]) for r in nodes],
        "edges": [(r["s"], r["t"], r["tp"], r["w"]) for r in edges],
        "prompt": props,
    }


def checksum(snap: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(snap, sort_keys=True, default=str).encode()).hexdigest()


def count_where(driver: Driver, database: str, query: Any, **params: Any) -> int:
    return int(driver.execute_query(query, params, database_=database).records[0][0])


@pytest.fixture
def db(neo4j_connection: Neo4jConnection) -> str:
    return neo4j_connection.database


@pytest.fixture
def writer(neo4j_driver: Driver, db: str) -> GraphWriter:
    return GraphWriter(neo4j_driver, db)


def delete_named(driver: Driver, db: str, names: Names) -> None:
    """Delete everything a test wrote under `names`: its prompts, then its features, tokens, transcoder and model."""
    cleaner = GraphWriter(driver, db)
    for pid in names.prompts:
        cleaner.delete_prompt(pid)
    for query in (
        "MATCH (f:Feature {transcoder: $tc}) DETACH DELETE f",
        "MATCH (t:Token {model: $model}) DETACH DELETE t",
        "MATCH (t:Transcoder {id: $tc}) DETACH DELETE t",
        "MATCH (m:Model {name: $model}) DETACH DELETE m",
    ):
        driver.execute_query(query, tc=names.transcoder, model=names.model, database_=db)


@pytest.fixture
def names(neo4j_driver: Driver, db: str) -> Iterator[Names]:
    names = Names()
    yield names
    delete_named(neo4j_driver, db, names)


def test_ensure_schema_is_idempotent_and_creates_every_rule(neo4j_driver: Driver, db: str) -> None:
    assert ensure_schema(neo4j_driver, db) == SCHEMA_VERSION
    assert ensure_schema(neo4j_driver, db) == SCHEMA_VERSION

    def rules(query: Any) -> set[tuple[str, tuple[str, ...]]]:
        records = neo4j_driver.execute_query(query, database_=db).records
        return {(r["labelsOrTypes"][0], tuple(r["properties"])) for r in records if r["labelsOrTypes"]}

    # Compared by schema, not by name: an equivalent rule created earlier under another name also satisfies it.
    constraints = rules("SHOW CONSTRAINTS YIELD type, labelsOrTypes, properties WHERE type = 'UNIQUENESS' RETURN *")
    indexes = rules("SHOW INDEXES YIELD type, labelsOrTypes, properties WHERE type = 'RANGE' RETURN *")
    assert {(label, props) for _, label, props in UNIQUE_KEYS} <= constraints
    assert {(label, props) for _, label, props in RANGE_INDEXES} <= indexes
    assert {(rel_type, props) for _, rel_type, props in RELATIONSHIP_INDEXES} <= indexes
    assert count_where(neo4j_driver, db, "MATCH (v:SchemaVersion) RETURN count(v)") == 1


def test_schema_migration_hook_upgrades_one_version_at_a_time(neo4j_driver: Driver, db: str) -> None:
    ensure_schema(neo4j_driver, db)
    set_version = "MATCH (v:SchemaVersion) SET v.version = $v"
    calls: list[int] = []

    def from_0(tx: Any) -> None:
        calls.append(0)
        tx.run("MATCH (v:SchemaVersion) SET v.migrated_from_0 = true").consume()

    try:
        neo4j_driver.execute_query(set_version, v=0, database_=db)
        with pytest.raises(SchemaVersionError, match="no migration from schema version 0"):
            ensure_schema(neo4j_driver, db, migrations={})
        assert read_schema_version(neo4j_driver, db) == 0  # nothing half-done
        assert ensure_schema(neo4j_driver, db, target_version=1, migrations={0: from_0}) == 1
        assert calls == [0]
        assert read_schema_version(neo4j_driver, db) == 1
        assert ensure_schema(neo4j_driver, db, target_version=1, migrations={0: from_0}) == 1 and calls == [0]
        # and on to the current version through the real migrations (1 -> 2 builds the aggregate layer)
        assert ensure_schema(neo4j_driver, db) == SCHEMA_VERSION

        neo4j_driver.execute_query(set_version, v=SCHEMA_VERSION + 1, database_=db)
        with pytest.raises(SchemaVersionError, match="newer than this code"):
            ensure_schema(neo4j_driver, db)
    finally:
        neo4j_driver.execute_query(
            "MATCH (v:SchemaVersion) SET v.version = $v REMOVE v.migrated_from_0", v=SCHEMA_VERSION, database_=db
        )


def test_migration_3_to_4_hashes_nodes_and_rekeys_the_aggregate_layer(
    writer: GraphWriter, neo4j_driver: Driver, db: str, names: Names
) -> None:
    """A version-3 store (string pair keys, stored float sums, nodes without `h`) is converted on upgrade; later
    writes find and update those relationships instead of duplicating them."""
    graph = make_graph(names, names.prompt("keyed"))
    writer.write_prompt(*graph)
    of_ours = "MATCH (f:Feature {transcoder: $tc})-[g:AGG_EDGE]->(t) "
    pairs = neo4j_driver.execute_query(of_ours + "RETURN f.key AS f, t.key AS t, g.pair AS pair", tc=names.transcoder,
                                       database_=db).records  # fmt: skip
    assert pairs and all(r["pair"] == pair_key(r["f"], r["t"]) for r in pairs)
    # Back to the version-3 layout: string keys, stored float sums, no node hashes.
    neo4j_driver.execute_query(
        of_ours + "SET g.pair = toString(size(f.key)) + ':' + f.key + '>' + t.key, "
        "g.sum_weight = toFloat(g.sum_weight_fx) / 2.0 ^ 32, g.sum_abs_weight = 1.0, g.mean_weight = 1.0 "
        "REMOVE f.h, t.h",
        tc=names.transcoder, database_=db,
    )  # fmt: skip
    neo4j_driver.execute_query("MATCH (v:SchemaVersion) SET v.version = 3", database_=db)
    assert ensure_schema(neo4j_driver, db) == SCHEMA_VERSION == 5
    after = neo4j_driver.execute_query(
        of_ours + "RETURN f.key AS f, t.key AS t, f.h AS fh, t.h AS th, g.pair AS pair, keys(g) AS props",
        tc=names.transcoder, database_=db,
    ).records  # fmt: skip
    assert sorted(r["pair"] for r in after) == sorted(r["pair"] for r in pairs)
    assert all(r["fh"] == node_hash(r["f"]) and r["th"] == node_hash(r["t"]) for r in after)
    assert all(
        set(r["props"]) == {"pair", "n_prompts", "n_edges", "sum_weight_fx", "sum_abs_weight_fx", "max_abs_weight"}
        for r in after
    )
    writer.write_prompt(*make_graph(names, names.prompt("keyed-2")))  # same pairs again: updated, not duplicated
    incremental = aggregate_rows(neo4j_driver, db, transcoder=names.transcoder)
    assert len(incremental) == len(pairs) and {r.n_prompts for r in incremental} == {2}
    rebuild_aggregates(neo4j_driver, db, transcoder=names.transcoder)
    assert aggregate_rows(neo4j_driver, db, transcoder=names.transcoder) == incremental


def test_pair_keys_that_collide_stay_apart(writer: GraphWriter, neo4j_driver: Driver, db: str, names: Names) -> None:
    """Two Features with the same hash give two pairs with one key: each update still finds its own relationship."""
    graph = make_graph(names, names.prompt("collide"))
    writer.write_prompt(*graph)
    neo4j_driver.execute_query(  # every Feature and Token of ours now hashes to 7: all their pairs share one key
        "MATCH (n) WHERE (n:Feature AND n.transcoder = $tc) OR (n:Token AND n.model = $model) SET n.h = 7",
        tc=names.transcoder, model=names.model, database_=db,
    )  # fmt: skip
    rebuild_aggregates(neo4j_driver, db, transcoder=names.transcoder)
    rows = aggregate_rows(neo4j_driver, db, transcoder=names.transcoder)
    assert len(rows) > 2
    writer.write_prompt(*make_graph(names, names.prompt("collide-2")))
    incremental = aggregate_rows(neo4j_driver, db, transcoder=names.transcoder)
    assert [(r.source_key, r.target_key) for r in incremental] == [(r.source_key, r.target_key) for r in rows]
    assert {r.n_prompts for r in incremental} == {2}
    rebuild_aggregates(neo4j_driver, db, transcoder=names.transcoder)
    assert aggregate_rows(neo4j_driver, db, transcoder=names.transcoder) == incremental


def test_write_gives_expected_nodes_edges_and_shared_features(
    writer: GraphWriter, neo4j_driver: Driver, db: str, names: Names
) -> None:
    before = writer.store_counts()
    meta_a, nodes_a, edges_a = make_graph(names, names.prompt("a"))
    # Prompt b shares the feature (layer 0, feature 7) with a; (1, 5) is its own; token 202 is shared too.
    meta_b, nodes_b, edges_b = make_graph(
        names, names.prompt("b"), features=[(0, 1, 7, 0.5), (1, 0, 5, 1.0)], tokens=[202, 505], logits=[]
    )
    result = writer.write_prompt(meta_a, nodes_a, edges_a)
    assert (result.n_nodes, result.n_edges, result.replaced) == (nodes_a.num_rows, edges_a.num_rows, False)
    writer.write_prompt(meta_b, nodes_b, edges_b)

    after = writer.store_counts()
    assert after == StoreCounts(
        before.prompts + 2,
        before.instance_nodes + nodes_a.num_rows + nodes_b.num_rows,
        before.edges + edges_a.num_rows + edges_b.num_rows,
    )
    assert writer.prompt_exists(meta_a["id"]) and writer.prompt_exists(meta_b["id"])

    # One :Feature per distinct key; the shared one is linked from both prompts.
    keys = set(nodes_a.column("feature_key").drop_null().to_pylist()) | set(
        nodes_b.column("feature_key").drop_null().to_pylist()
    )
    assert count_where(
        neo4j_driver, db, "MATCH (f:Feature {transcoder: $tc}) RETURN count(f)", tc=names.transcoder
    ) == len(keys)
    shared = feature_key(names.transcoder, 0, 7)
    records = neo4j_driver.execute_query(
        "MATCH (f:Feature {key: $key})<-[:OF]-(a:FeatureActivation) RETURN f.layer AS layer, f.index AS index, "
        "a.prompt_id AS pid, a.position AS pos ORDER BY pid, pos",
        key=shared,
        database_=db,
    ).records
    assert [(r["pid"], r["pos"]) for r in records] == [(meta_a["id"], 0), (meta_b["id"], 1)]
    assert {(r["layer"], r["index"]) for r in records} == {(0, 7)}
    # Tokens: one per (model, id), shared across prompts; the custom-direction logit has no OF.
    assert count_where(neo4j_driver, db, "MATCH (t:Token {model: $m}) RETURN count(t)", m=names.model) == 5
    assert count_where(neo4j_driver, db, "MATCH (t:Token {model: $m, id: 202})<-[:OF]-(n) RETURN count(n)",
                       m=names.model) == 2  # fmt: skip
    texts = neo4j_driver.execute_query(
        "MATCH (t:Token {model: $m}) RETURN t.id AS id, t.text AS text ORDER BY id", m=names.model, database_=db
    ).records
    assert [(r["id"], r["text"]) for r in texts] == [
        (101, "tok101"), (202, "tok202"), (303, "tok303"), (404, " Paris"), (505, "tok505")
    ]  # fmt: skip

    snap = snapshot(neo4j_driver, db, meta_a["id"])
    expected_labels = {
        "feature": "FeatureActivation",
        "error": "ErrorNode",
        "token": "InputToken",
        "logit": "LogitTarget",
    }
    for row, (i, labels, props, of, prompts) in zip(nodes_a.to_pylist(), snap["nodes"], strict=True):
        assert i == row["node_index"] and prompts == [meta_a["id"]]
        assert labels == sorted(["Instance", expected_labels[row["kind"]]])
        assert props["node_id"] == row["node_id"] and props["position"] == row["position"]
        assert props.get("influence") == row["influence"]
        if row["kind"] == "feature":
            assert of == [row["feature_key"]] and props["activation"] == row["activation"]
        elif row["kind"] == "error":
            assert of == [""] and props["norm"] == row["activation"] and props["layer"] == row["layer"]
        elif row["kind"] == "logit" and row["token_id"] is None:
            assert of == [""] and props["label"] == "direction" and props["probability"] == row["probability"]
        else:
            assert of == [f"{names.model}/{row['token_id']}"]
    expected_edges = sorted(
        (s, t, meta_a["id"], w)
        for s, t, w in zip(*(edges_a.column(c).to_pylist() for c in ("source", "target", "weight")), strict=True)
    )
    assert snap["edges"] == expected_edges  # float32 weights stored exactly (as doubles)
    assert snap["prompt"]["n_nodes"] == nodes_a.num_rows and snap["prompt"]["n_edges"] == edges_a.num_rows
    assert snap["prompt"]["tokens"] == [101, 202, 303] and snap["prompt"]["model"] == names.model


def test_rewriting_a_prompt_replaces_it_without_duplicates(
    writer: GraphWriter, neo4j_driver: Driver, db: str, names: Names
) -> None:
    graph = make_graph(names, names.prompt("x"))
    pid = graph[0]["id"]
    writer.write_prompt(*graph)
    counts, features = writer.store_counts(), count_where(neo4j_driver, db, "MATCH (f:Feature) RETURN count(f)")
    first = checksum(snapshot(neo4j_driver, db, pid))

    again = writer.write_prompt(*graph)
    assert again.replaced
    assert writer.store_counts() == counts
    assert count_where(neo4j_driver, db, "MATCH (f:Feature) RETURN count(f)") == features
    assert checksum(snapshot(neo4j_driver, db, pid)) == first

    # A different version of the same prompt replaces the old one completely.
    smaller = make_graph(names, pid, features=[(1, 0, 9, 4.0)], errors=[], logits=[], edges=[(0, 1, 0.5), (1, 2, -1.0)])
    writer.write_prompt(*smaller)
    snap = snapshot(neo4j_driver, db, pid)
    assert [n[0] for n in snap["nodes"]] == list(range(smaller[1].num_rows))
    assert snap["edges"] == [(0, 1, pid, 0.5), (1, 2, pid, -1.0)]
    assert writer.store_counts() == StoreCounts(
        counts.prompts,
        counts.instance_nodes - graph[1].num_rows + smaller[1].num_rows,
        counts.edges - graph[2].num_rows + 2,
    )


def _drop(table: pa.Table, name: str) -> pa.Table:
    return table.drop_columns([name])


def _retype(table: pa.Table, name: str, type_: pa.DataType) -> pa.Table:
    i = table.column_names.index(name)
    return table.set_column(i, pa.field(name, type_), table.column(name).cast(type_))


def _replace(table: pa.Table, name: str, values: list[Any]) -> pa.Table:
    i = table.column_names.index(name)
    return table.set_column(i, table.schema.field(name), pa.array(values, table.schema.field(name).type))


def _set_first(table: pa.Table, name: str, *first: Any) -> pa.Table:
    """`table` with the first values of column `name` replaced by `first`."""
    return _replace(table, name, [*first, *table.column(name).to_pylist()[len(first) :]])


BAD_INPUTS: dict[str, tuple[Any, str]] = {
    "edges missing weight": (lambda m, n, e: (m, n, _drop(e, "weight")), "edges: missing column 'weight'"),
    "nodes missing kind": (lambda m, n, e: (m, _drop(n, "kind"), e), "nodes: missing column 'kind'"),
    "node_index int64": (
        lambda m, n, e: (m, _retype(n, "node_index", pa.int64()), e),
        "nodes: column 'node_index' has type int64, expected int32",
    ),
    "weight float64": (
        lambda m, n, e: (m, n, _retype(e, "weight", pa.float64())),
        "edges: column 'weight' has type double, expected float",
    ),
    "null position": (
        lambda m, n, e: (m, _set_first(n, "position", None), e),
        "nodes: column 'position' has 1 null",
    ),
    "unknown kind": (
        lambda m, n, e: (m, _set_first(n, "kind", "feature", "mystery"), e),
        "kind 'mystery'",
    ),
    "edge to missing node": (
        lambda m, n, e: (m, n, _set_first(e, "target", 999)),
        "edges: target 999 is not a node_index",
    ),
    "duplicate node_index": (
        lambda m, n, e: (m, _set_first(n, "node_index", 0, 0), e),
        "node_index 0 occurs more than once",
    ),
    "feature key of another transcoder": (
        lambda m, n, e: (m, _set_first(n, "feature_key", "other/0/7"), e),
        "feature_key 'other/0/7'",
    ),
    "other prompt id in edges": (
        lambda m, n, e: (m, n, _replace(e, "prompt_id", ["elsewhere"] * e.num_rows)),
        "edges: column 'prompt_id' holds values other than",
    ),
    "NaN weight": (
        lambda m, n, e: (m, n, _set_first(e, "weight", float("nan"))),
        "NaN or infinite",
    ),
    "meta without model": (lambda m, n, e: ({k: v for k, v in m.items() if k != "model"}, n, e), "'model'"),
    "meta with a map": (lambda m, n, e: ({**m, "run": {"nested": 1}}, n, e), "prompt_meta['run']"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_clearly_and_leaves_the_store_unchanged(
    case: str, writer: GraphWriter, neo4j_driver: Driver, db: str, names: Names
) -> None:
    graph = make_graph(names, names.prompt("v"))
    writer.write_prompt(*graph)
    counts, before = writer.store_counts(), checksum(snapshot(neo4j_driver, db, graph[0]["id"]))
    corrupt, message = BAD_INPUTS[case]
    bad_changes = make_graph(names, graph[0]["id"], features=[(1, 0, 9, 4.0)])  # would change the prompt if written
    with pytest.raises(GraphValidationError, match=message.replace("(", r"\(").replace("[", r"\[")):
        writer.write_prompt(*corrupt(*bad_changes))
    assert writer.store_counts() == counts
    assert checksum(snapshot(neo4j_driver, db, graph[0]["id"])) == before


class Boom(RuntimeError):
    pass


def test_failure_mid_prompt_leaves_no_partial_graph_and_keeps_the_previous_version(
    neo4j_driver: Driver, db: str, names: Names
) -> None:
    writer = GraphWriter(neo4j_driver, db, batch_size=3)  # several edge batches per prompt
    v1 = make_graph(names, names.prompt("p"))
    pid = v1[0]["id"]
    writer.write_prompt(*v1)
    counts, before = writer.store_counts(), checksum(snapshot(neo4j_driver, db, pid))
    seen: list[tuple[str, int]] = []
    observed: list[dict[str, Any]] = []

    def fail_after_first_edge_batch(stage: str, rows: int) -> None:
        seen.append((stage, rows))
        # While the writer's transaction is open, another session sees the old version, whole.
        observed.append(snapshot(neo4j_driver, db, pid))
        if stage == "edges":
            raise Boom("injected failure after the first edge batch")

    failing = GraphWriter(neo4j_driver, db, batch_size=3, after_batch=fail_after_first_edge_batch)
    v2 = make_graph(names, pid, features=[(1, 0, 9, 4.0), (1, 1, 11, 1.0)], errors=[(0, 0, 0.1)])
    with pytest.raises(Boom):
        failing.write_prompt(*v2)
    assert [s for s, _ in seen][-1] == "edges" and len(seen) >= 3  # nodes were created, one edge batch too
    assert all(checksum(o) == before for o in observed)
    assert writer.store_counts() == counts
    assert checksum(snapshot(neo4j_driver, db, pid)) == before

    # A brand-new prompt that fails part-way leaves nothing at all.
    seen.clear()
    observed.clear()
    new = make_graph(names, names.prompt("new"))
    with pytest.raises(Boom):
        failing.write_prompt(*new)
    assert not writer.prompt_exists(new[0]["id"])
    assert snapshot(neo4j_driver, db, new[0]["id"]) == {"nodes": [], "edges": [], "prompt": None}
    assert writer.store_counts() == counts


def test_transient_error_is_retried_and_writes_once(neo4j_driver: Driver, db: str, names: Names) -> None:
    attempts: list[str] = []

    def flaky(stage: str, rows: int) -> None:
        if stage == "edges" and not attempts:
            attempts.append(stage)
            raise ServiceUnavailable("injected: connection lost mid-prompt")

    writer = GraphWriter(neo4j_driver, db, batch_size=4, after_batch=flaky)
    graph = make_graph(names, names.prompt("flaky"))
    before = writer.store_counts()
    result = writer.write_prompt(*graph)
    assert attempts == ["edges"] and not result.replaced
    assert writer.store_counts() == StoreCounts(
        before.prompts + 1, before.instance_nodes + graph[1].num_rows, before.edges + graph[2].num_rows
    )


def test_delete_prompt_and_exists(writer: GraphWriter, neo4j_driver: Driver, db: str, names: Names) -> None:
    graph = make_graph(names, names.prompt("d"))
    pid = graph[0]["id"]
    assert not writer.prompt_exists(pid)
    before = writer.store_counts()
    writer.write_prompt(*graph)
    assert writer.prompt_exists(pid)
    assert writer.delete_prompt(pid)
    assert not writer.prompt_exists(pid)
    assert not writer.delete_prompt(pid)
    assert writer.store_counts() == before
    # Shared identity nodes stay for other prompts.
    assert count_where(neo4j_driver, db, "MATCH (f:Feature {transcoder: $tc}) RETURN count(f)", tc=names.transcoder) > 0


def test_write_prompts_on_two_threads(writer: GraphWriter, neo4j_driver: Driver, db: str, names: Names) -> None:
    graphs = [make_graph(names, names.prompt(f"t{i}"), features=[(0, 0, 7, 1.0), (1, 1, i, 2.0)]) for i in range(6)]
    before = writer.store_counts()
    results = writer.write_prompts(graphs, workers=2)
    assert [r.prompt_id for r in results] == [g[0]["id"] for g in graphs]
    assert writer.store_counts() == StoreCounts(
        before.prompts + 6,
        before.instance_nodes + sum(g[1].num_rows for g in graphs),
        before.edges + sum(g[2].num_rows for g in graphs),
    )
    shared = feature_key(names.transcoder, 0, 7)
    assert count_where(neo4j_driver, db, "MATCH (f:Feature {key: $k})<-[:OF]-(a) RETURN count(a)", k=shared) == 6


def _random_graph(names: Names, rng: np.random.Generator, name: str, shift: int) -> Graph:
    """Features recur across prompts (few distinct keys), some at two positions of one prompt; random DAG edges."""
    feats = sorted({(int(rng.integers(0, 3)), int(rng.integers(0, 3)), int(rng.integers(0, 4)) + shift % 2,
                     float(rng.uniform(0.1, 2))) for _ in range(6)}, key=lambda f: f[:3])  # fmt: skip
    feats = list({f[:3]: f for f in feats}.values())
    n = len(feats) + 2 + 3 + 2
    edges = sorted({(int(s), int(t)) for s, t in rng.integers(0, n, (25, 2)) if s < t})
    weighted = [(s, t, float(np.float32(rng.normal(0, 0.3)))) for s, t in edges]
    return make_graph(names, names.prompt(name), features=feats, edges=weighted,
                      logits=((404, " Paris", 0.5, 1.0), (505, " Rome", 0.25, 0.5)))  # fmt: skip


def test_aggregates_stay_exact_through_writes_replacements_and_deletes(
    neo4j_driver: Driver, db: str, names: Names
) -> None:
    """Incremental aggregate maintenance equals a from-scratch rebuild, exactly, after a mixed sequence."""
    writer = GraphWriter(neo4j_driver, db, batch_size=5)
    rng = np.random.default_rng(3)

    def random_graph(name: str, shift: int) -> Graph:
        return _random_graph(names, rng, name, shift)

    graphs = {f"p{i}": random_graph(f"p{i}", i) for i in range(6)}
    for g in graphs.values():
        writer.write_prompt(*g)
    replaced = random_graph("p1", 7)  # same prompt id as p1 (a new call registers it again; harmless)
    assert replaced[0]["id"] == graphs["p1"][0]["id"]
    writer.write_prompt(*replaced)
    writer.write_prompt(*graphs["p2"])  # identical re-ingest
    writer.delete_prompt(graphs["p3"][0]["id"])
    writer.write_prompt(*graphs["p4"])
    writer.delete_prompt(graphs["p4"][0]["id"])
    p6 = random_graph("p6", 1)
    writer.write_prompts([graphs["p3"], p6], workers=2)
    # A bulk load without aggregates, then the ingest hook adds those prompts (once), and an aggregating re-write of
    # one of them does not subtract what was never added.
    bulk = GraphWriter(neo4j_driver, db, aggregates=False)
    p7, p8 = random_graph("p7", 2), random_graph("p8", 3)
    bulk.write_prompts([p7, p8])
    assert update_for_prompts(neo4j_driver, [p7[0]["id"], p8[0]["id"], "no-such-prompt"], database=db) == 2
    assert update_for_prompts(neo4j_driver, [p7[0]["id"], p8[0]["id"]], database=db) == 0
    # Deferred maintenance in batches: prompts sharing pairs are added in one sweep per batch (3 + 1 here).
    deferred = [random_graph(f"q{i}", i) for i in range(4)]
    bulk.write_prompts(deferred)
    ids = [g[0]["id"] for g in deferred]
    assert update_for_prompts(neo4j_driver, [*ids, p7[0]["id"]], database=db, prompts_per_tx=3) == 4
    with pytest.raises(ValueError, match="prompts_per_tx"):
        update_for_prompts(neo4j_driver, ids, database=db, prompts_per_tx=0)
    bulk.write_prompt(*p8)  # p8 now un-aggregated again (its contributions were subtracted first)
    writer.write_prompt(*p8)
    p9 = random_graph("p9", 4)
    bulk.write_prompt(*p9)
    bulk.delete_prompt(p7[0]["id"])  # deleting subtracts whatever writer wrote it, if it was aggregated
    writer.write_prompt(*p9)

    incremental = aggregate_rows(neo4j_driver, db, transcoder=names.transcoder)
    assert incremental and {r.target_kind for r in incremental} == {"feature", "token"}
    rebuilt = rebuild_aggregates(neo4j_driver, db, transcoder=names.transcoder)
    scratch = aggregate_rows(neo4j_driver, db, transcoder=names.transcoder)
    assert rebuilt.relationships == len(scratch)
    assert incremental == scratch  # exact: fixed-point sums, max recomputed on removal

    # And against an independent computation in Python from the tables of the prompts now stored.
    stored = [replaced, graphs["p0"], graphs["p2"], graphs["p5"], graphs["p3"], p6, p8, p9, *deferred]
    expected: dict[tuple[str, str], list[float]] = {}
    prompts_of: dict[tuple[str, str], set[str]] = {}
    for meta, nodes, edges in stored:
        rows = nodes.to_pylist()
        for s, t, w in zip(*(edges.column(c).to_pylist() for c in ("source", "target", "weight")), strict=True):
            a, b = rows[s], rows[t]
            if (
                a["kind"] != "feature"
                or b["kind"] not in ("feature", "logit")
                or (b["kind"] == "logit" and b["token_id"] is None)
            ):
                continue
            target = b["feature_key"] if b["kind"] == "feature" else f"{names.model}/{b['token_id']}"
            expected.setdefault((a["feature_key"], target), []).append(w)
            prompts_of.setdefault((a["feature_key"], target), set()).add(meta["id"])
    got = {(r.source_key, r.target_key): r for r in scratch}
    assert set(got) == set(expected)
    for pair, weights in expected.items():
        row = got[pair]
        assert row.n_edges == len(weights) and row.max_abs_weight == max(abs(w) for w in weights)
        assert row.n_prompts == len(prompts_of[pair])
        assert row.mean_weight == pytest.approx(sum(weights) / len(prompts_of[pair]), abs=1e-8)
        assert row.sum_weight == pytest.approx(sum(weights), abs=1e-8)
        assert row.sum_abs_weight == pytest.approx(sum(abs(w) for w in weights), abs=1e-8)

    # Deleting every prompt removes every aggregate of the transcoder.
    for meta, _, _ in stored:
        writer.delete_prompt(meta["id"])
    assert aggregate_rows(neo4j_driver, db, transcoder=names.transcoder) == []


def test_pipelined_writes_leave_the_layer_equal_to_a_rebuild(neo4j_driver: Driver, db: str, names: Names) -> None:
    """`write_prompts` adds prompts on the background aggregator; replacements, also of a prompt that may still be
    queued, and re-ingests of aggregated prompts keep the layer exact, and every prompt is aggregated on return."""
    writer = GraphWriter(neo4j_driver, db, batch_size=7)
    rng = np.random.default_rng(11)
    first = [_random_graph(names, rng, f"r{i}", i) for i in range(8)]
    writer.write_prompts(first, workers=2)
    again = _random_graph(names, rng, "r3", 5)  # replaces an aggregated prompt, with other edges
    s0_a, s0_b = _random_graph(names, rng, "s0", 0), _random_graph(names, rng, "s0", 1)  # s0_b replaces s0_a
    s1 = _random_graph(names, rng, "s1", 2)
    writer.write_prompts([first[0], again, s0_a, s0_b, s1])
    final = [*first[:3], again, *first[4:], s0_b, s1]
    ids = [g[0]["id"] for g in final]
    flags = neo4j_driver.execute_query(
        "UNWIND $ids AS id MATCH (p:Prompt {id: id}) RETURN p.aggregated AS a", ids=ids, database_=db
    ).records
    assert len(flags) == len(ids) and all(r["a"] is True for r in flags)
    assert update_for_prompts(neo4j_driver, ids, database=db) == 0  # nothing was left for the ingest hook
    pipelined = aggregate_rows(neo4j_driver, db, transcoder=names.transcoder)
    rebuild_aggregates(neo4j_driver, db, transcoder=names.transcoder)
    assert pipelined and pipelined == aggregate_rows(neo4j_driver, db, transcoder=names.transcoder)
    # The layer does not depend on the mode: the final versions written with in-transaction maintenance give it too.
    for prompt_id in ids:
        writer.delete_prompt(prompt_id)
    assert aggregate_rows(neo4j_driver, db, transcoder=names.transcoder) == []
    writer.write_prompts(final, pipelined=False)
    assert aggregate_rows(neo4j_driver, db, transcoder=names.transcoder) == pipelined


def test_background_aggregator_names_the_prompts_it_could_not_add(neo4j_driver: Driver) -> None:
    aggregator = BackgroundAggregator(neo4j_driver, database="no-such-database")
    aggregator.submit("prompt-a")
    aggregator.submit("prompt-b")
    with pytest.raises(AggregateBacklogError, match="2 written prompt") as caught:
        aggregator.drain()
    assert caught.value.prompt_ids == ["prompt-a", "prompt-b"]
    aggregator.close()  # the backlog was reported once; closing stops the thread
    with pytest.raises(RuntimeError, match="closed"):
        aggregator.submit("prompt-c")


def _unknown_key_notifications(driver: Driver, db: str, statement: str) -> list[str]:
    summary = driver.execute_query("EXPLAIN " + statement, database_=db).summary
    return [s.status_description for s in summary.gql_status_objects if s.gql_status == "01N52"]  # unknown key


def test_reading_the_aggregated_flag_sends_no_unknown_property_notification(neo4j_driver: Driver, db: str) -> None:
    """On a new store no Prompt has the `aggregated` property yet, and `p.aggregated` made the server send an
    "unknown property key" warning that the driver logged during every first `make demo`. Every statement that reads
    the flag is compiled here with the key renamed to one that exists nowhere, which is the new store's situation."""
    from atlas.storage import aggregate, neo4j_writer

    missing = f"aggregated_{uuid.uuid4().hex}"
    control = f"MATCH (p:Prompt) WHERE p.{missing} RETURN p"
    assert _unknown_key_notifications(neo4j_driver, db, control), "the server no longer reports unknown keys"
    statements = {
        f"{module.__name__}.{name}": value
        for module in (aggregate, neo4j_writer)
        for name, value in vars(module).items()
        if name.startswith("_") and isinstance(value, str) and "aggregated" in value and "(p:Prompt" in value
    }
    assert {"atlas.storage.aggregate._UNAGGREGATED", "atlas.storage.aggregate._READ_FLAG",
            "atlas.storage.neo4j_writer._MERGE_PROMPT"} <= set(statements)  # fmt: skip
    for name, statement in statements.items():
        renamed = statement.replace("aggregated", missing)
        assert _unknown_key_notifications(neo4j_driver, db, renamed) == [], name
