"""The query library against a real Neo4j (fixtures in `neo4j_fixtures`), on synthetic prompts with a planted circuit.

Seven prompts share one transcoder and model (unique per module run). Prompts c0..c4 ("capitals" task) contain the
planted path  Dallas (L2) -> Texas (L5) -> say-a-capital (L8) -> logit " Austin"  with strong weights, plus decoys
(weaker direct and two-hop routes to " Austin", a strong route to the non-target " the") and random noise features
and edges; prompts o0, o1 ("other" task) have noise only. Prompt c2's planted path is the strongest of all.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from neo4j import Driver, GraphDatabase

from atlas.attribution.graph import EDGE_SCHEMA, NODE_SCHEMA, feature_key
from atlas.storage.feature_stats import FeatureStatsStore
from atlas.storage.neo4j_server import Neo4jConnection, free_loopback_port
from atlas.storage.neo4j_writer import GraphWriter
from atlas.storage.queries import (
    MAX_HOPS,
    MAX_LIMIT,
    AtlasQueries,
    QueryError,
    QueryResult,
    StoreUnavailableError,
)

Graph = tuple[dict[str, Any], pa.Table, pa.Table]

DALLAS, TEXAS, CAPITAL = (2, 11), (5, 22), (8, 33)  # (layer, index)
AUSTIN, SACRAMENTO, THE = 9001, 9002, 9003
PLANT_SCALE = {"c0": 1.0, "c1": 0.9, "c2": 1.2, "c3": 0.8, "c4": 0.7}  # c2 strongest
W_DT, W_TC, W_CA = 0.9, 0.8, 0.7


@dataclass
class Spec:
    """One prompt: features (name -> (layer, index, position, activation, influence)), logits, edges by name."""

    pid: str
    task: str
    features: dict[str, tuple[int, int, int, float, float]] = field(default_factory=dict)
    logits: dict[str, tuple[int, str, float]] = field(default_factory=dict)  # name -> (token id, text, probability)
    edges: list[tuple[str, str, float]] = field(default_factory=list)


@dataclass
class World:
    tag: str
    model: str
    transcoder: str
    specs: dict[str, Spec]
    graphs: dict[str, Graph]

    def key(self, li: tuple[int, int]) -> str:
        return feature_key(self.transcoder, *li)

    def pid(self, name: str) -> str:
        return self.specs[name].pid


def build(world_model: str, transcoder: str, spec: Spec, n_tokens: int = 6) -> Graph:
    rows: dict[str, list[Any]] = {name: [] for name in NODE_SCHEMA.names}
    index: dict[str, int] = {}

    def add(name: str, kind: str, node_id: str, position: int, influence: float | None, **values: Any) -> None:
        index[name] = len(rows["node_index"])
        rows["prompt_id"].append(spec.pid)
        rows["node_index"].append(index[name])
        rows["node_id"].append(node_id)
        rows["kind"].append(kind)
        rows["position"].append(position)
        for col in ("layer", "feature", "feature_key", "token_id", "token", "activation", "probability"):
            rows[col].append(values.get(col))
        rows["influence"].append(influence)

    for name, (layer, idx, pos, act, infl) in sorted(spec.features.items(), key=lambda kv: kv[1][:3]):
        add(name, "feature", f"{layer}_{idx}_{pos}", pos, infl, layer=layer, feature=idx,
            feature_key=feature_key(transcoder, layer, idx), activation=act)  # fmt: skip
    add("err", "error", f"3_-1_{n_tokens - 1}", n_tokens - 1, 0.9, layer=3, activation=0.5)
    for pos in range(n_tokens):
        tid = 100 + pos
        add(f"tok{pos}", "token", f"E_{tid}_{pos}", pos, 0.5, token_id=tid, token=f"w{pos}")
    for name, (tid, text, prob) in spec.logits.items():
        add(name, "logit", f"9_{tid}_{n_tokens - 1}", n_tokens - 1, 0.0, token_id=tid, token=text, probability=prob,
            activation=2.0 * prob)  # fmt: skip
    nodes = pa.Table.from_pydict(rows, schema=NODE_SCHEMA)
    edges = pa.Table.from_pydict(
        {
            "prompt_id": [spec.pid] * len(spec.edges),
            "source": [index[s] for s, _, _ in spec.edges],
            "target": [index[t] for _, t, _ in spec.edges],
            "weight": [w for _, _, w in spec.edges],
        },
        schema=EDGE_SCHEMA,
    )
    meta = {"id": spec.pid, "text": f"prompt {spec.pid}", "model": world_model, "transcoder": transcoder,
            "run": "run-q", "task": spec.task}  # fmt: skip
    return meta, nodes, edges


def make_specs(tag: str, rng: np.random.Generator) -> dict[str, Spec]:
    specs: dict[str, Spec] = {}
    for name in ["c0", "c1", "c2", "c3", "c4", "o0", "o1"]:
        spec = Spec(f"q-{tag}-{name}", "capitals" if name.startswith("c") else "other")
        noise = {f"n{i}": (int(rng.integers(0, 10)), 1000 + int(rng.integers(0, 40)) + 100 * i, int(rng.integers(0, 6)),
                           float(rng.uniform(0.1, 1)), float(rng.uniform(0.3, 1))) for i in range(6)}  # fmt: skip
        spec.features.update(noise)
        spec.logits.update({"austin": (AUSTIN, " Austin", 0.6), "the": (THE, " the", 0.3)})
        if name.startswith("c"):
            k = PLANT_SCALE[name]
            spec.features.update(
                dallas=(*DALLAS, 3, 2.0 * k, 0.05 * k), texas=(*TEXAS, 3, 1.5, 0.1), capital=(*CAPITAL, 5, 1.0, 0.2)
            )
            spec.logits["sacramento"] = (SACRAMENTO, " Sacramento", 0.1)
            spec.edges += [
                ("dallas", "texas", W_DT * k), ("texas", "capital", W_TC), ("capital", "austin", W_CA),
                ("dallas", "austin", 0.3),  # decoy: direct, weaker than the planted product
                ("dallas", "n0", 0.6), ("n0", "austin", 0.5),  # decoy: 0.30 over two hops
                ("capital", "the", 2.0), ("texas", "sacramento", -0.2),  # strong but to a non-target / negative
            ]  # fmt: skip
        # noise edges (weak), features -> features/logits and tokens -> features
        names = sorted(noise)
        for i, s in enumerate(names):
            for t in names[i + 1 : i + 3]:
                spec.edges.append((s, t, float(rng.uniform(-0.04, 0.04))))
            spec.edges.append((s, "the", float(rng.uniform(-0.04, 0.04))))
            spec.edges.append((f"tok{i % 6}", s, float(rng.uniform(-0.04, 0.04))))
        spec.edges.append(("err", names[0], 0.01))
        specs[name] = spec
    return specs


@pytest.fixture(scope="module")
def world(neo4j_driver: Driver, neo4j_connection: Neo4jConnection) -> Iterator[World]:
    tag = uuid.uuid4().hex[:8]
    model, transcoder = f"qmodel-{tag}", f"qclt-{tag}"
    specs = make_specs(tag, np.random.default_rng(7))
    graphs = {name: build(model, transcoder, spec) for name, spec in specs.items()}
    db = neo4j_connection.database
    writer = GraphWriter(neo4j_driver, db)
    writer.write_prompts(graphs.values())
    w = World(tag, model, transcoder, specs, graphs)
    writer.set_feature_labels({w.key(DALLAS): "Dallas (city)", w.key(TEXAS): "Texas", w.key(CAPITAL): "say a capital"})
    try:
        yield w
    finally:
        for spec in specs.values():
            writer.delete_prompt(spec.pid)
        for query in (
            "MATCH (f:Feature {transcoder: $tc}) DETACH DELETE f",
            "MATCH (t:Token {model: $model}) DETACH DELETE t",
            "MATCH (t:Transcoder {id: $tc}) DETACH DELETE t",
            "MATCH (m:Model {name: $model}) DETACH DELETE m",
        ):
            neo4j_driver.execute_query(query, tc=transcoder, model=model, database_=db)


@pytest.fixture(scope="module")
def q(neo4j_driver: Driver, neo4j_connection: Neo4jConnection) -> AtlasQueries:
    return AtlasQueries(neo4j_driver, neo4j_connection.database)


def check_result(result: QueryResult[Any]) -> None:
    assert "MATCH" in result.cypher and result.elapsed_ms > 0
    for name in result.params:
        assert f"${name}" in result.cypher, name


def test_planted_path_is_found_across_prompts_and_ranked_first(q: AtlasQueries, world: World) -> None:
    result = q.paths_to_logits([world.key(DALLAS)], [" Austin", " Sacramento"], max_hops=3, min_abs_weight=0.05,
                               limit=50, model=world.model)  # fmt: skip
    check_result(result)
    rows = result.rows
    top = rows[0]
    assert top.prompt_id == world.pid("c2")
    assert [n.kind for n in top.nodes] == ["feature", "feature", "feature", "logit"]
    assert [n.key for n in top.nodes] == [world.key(DALLAS), world.key(TEXAS), world.key(CAPITAL),
                                          f"{world.model}/{AUSTIN}"]  # fmt: skip
    assert top.nodes[0].position == 3 and top.nodes[2].position == 5 and top.nodes[3].text == " Austin"
    assert top.hops == 3 and top.target_text == " Austin" and top.source_key == world.key(DALLAS)
    expected = (np.float32(W_DT * 1.2), np.float32(W_TC), np.float32(W_CA))
    assert top.weights == pytest.approx([float(w) for w in expected], rel=0, abs=0)
    assert top.strength == pytest.approx(math.prod(float(w) for w in expected), rel=1e-12)
    assert top.bottleneck == pytest.approx(float(np.float32(W_CA)))
    # Every planted prompt's path is found, ranking is by |strength|, and no prompt without Dallas appears.
    planted = {r.prompt_id for r in rows if r.hops == 3 and r.nodes[2].key == world.key(CAPITAL)}
    assert planted == {world.pid(n) for n in PLANT_SCALE}
    assert {r.prompt_id for r in rows} <= {world.pid(n) for n in PLANT_SCALE}
    strengths = [abs(r.strength) for r in rows]
    assert strengths == sorted(strengths, reverse=True)
    # The negative edge to Sacramento gives a signed path Dallas -> Texas -> Sacramento.
    sac = [r for r in rows if r.target_text == " Sacramento"]
    assert sac and all(r.strength < 0 and r.hops == 2 for r in sac)
    # Decoys are found too, but weaker; the non-target " the" never appears.
    assert any(r.hops == 1 for r in rows) and all(r.nodes[-1].text != " the" for r in rows)
    for r in rows:
        assert all(abs(w) >= 0.05 for w in r.weights) and len(r.weights) == len(r.nodes) - 1


def test_path_bounds_and_sources_by_label(q: AtlasQueries, world: World) -> None:
    two = q.paths_to_logits(["Dallas"], [" Austin"], max_hops=2, min_abs_weight=0.05).rows
    assert two and max(r.hops for r in two) <= 2 and all(r.nodes[0].key == world.key(DALLAS) for r in two)
    strong = q.paths_to_logits(["Dallas (city)"], ["Austin"], max_hops=3, min_abs_weight=0.75).rows
    # Only edges >= 0.75 survive: Dallas->Texas (0.9 k >= 0.75 for k >= 0.84) -> capital (0.8) -> Austin (0.7) fails.
    assert strong == ()
    limited = q.paths_to_logits([world.key(DALLAS)], [" Austin"], max_hops=3, limit=2)
    assert len(limited.rows) == 2 and limited.rows[0].prompt_id == world.pid("c2")
    only = q.paths_to_logits([world.key(DALLAS)], [" Austin"], max_hops=3, prompt_ids=[world.pid("c3")]).rows
    assert only and {r.prompt_id for r in only} == {world.pid("c3")}
    # A target list is about whichever targets are stored: the unknown one is named in a note, not an error.
    partly = q.paths_to_logits([world.key(DALLAS)], [" Austin", f" Atlantis-{world.tag}"], max_hops=3, limit=200)
    full = q.paths_to_logits([world.key(DALLAS)], [" Austin"], max_hops=3, limit=200)
    assert [(r.prompt_id, r.weights) for r in partly.rows] == [(r.prompt_id, r.weights) for r in full.rows]
    assert any(f"Atlantis-{world.tag}" in n for n in partly.notes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sources": ["no-such-feature-xyz"]}, "unknown feature"),
        ({"target_tokens": [" Atlantis-xyz"]}, "unknown token"),
        ({"max_hops": 0}, "max_hops must be between 1"),
        ({"max_hops": MAX_HOPS + 1}, "max_hops must be between 1"),
        ({"min_abs_weight": -0.1}, "non-negative"),
        ({"min_abs_weight": float("nan")}, "non-negative"),
        ({"sources": []}, "feature references is empty"),
        ({"target_tokens": []}, "target tokens is empty"),
        ({"limit": 0}, "limit must be between"),
        ({"max_hops": 2.5}, "max_hops must be an integer"),
    ],
)
def test_path_query_rejects_bad_input(q: AtlasQueries, world: World, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"sources": [world.key(DALLAS)], "target_tokens": [" Austin"], **kwargs}
    with pytest.raises(QueryError, match=message):
        q.paths_to_logits(args.pop("sources"), args.pop("target_tokens"), **args)


def test_paths_and_features_from_an_input_token(q: AtlasQueries, world: World) -> None:
    """Sources given as "features active on an input token": here w3, the token at position 3 of every prompt, where
    the planted Dallas (and Texas) features sit."""
    at_pos3 = {
        name: {world.key(f[:2]) for f in spec.features.values() if f[2] == 3} for name, spec in world.specs.items()
    }
    on = q.features_on_token("w3", model=world.model)
    check_result(on)
    by_key = {r.feature_key: r for r in on.rows}
    assert set(by_key) == set().union(*at_pos3.values())  # exactly the features stored at position 3
    dallas = by_key[world.key(DALLAS)]
    assert dallas.n_prompts == 5 and dallas.prompt_ids == tuple(sorted(world.pid(n) for n in PLANT_SCALE))
    assert dallas.token_text == "w3" and dallas.label == "Dallas (city)" and dallas.max_activation == pytest.approx(2.4)
    assert on.rows[0].n_prompts == 5  # most prompts first
    assert world.key(CAPITAL) not in by_key  # active at position 5 only
    only_o0 = q.features_on_token("w3", model=world.model, prompt_ids=[world.pid("o0")]).rows
    assert {r.feature_key for r in only_o0} == at_pos3["o0"] and all(r.n_prompts == 1 for r in only_o0)

    result = q.paths_to_logits(None, [" Austin"], max_hops=3, min_abs_weight=0.05, limit=200, at_token="w3",
                               model=world.model)  # fmt: skip
    check_result(result)
    rows = result.rows
    assert rows[0].prompt_id == world.pid("c2") and rows[0].source_key == world.key(DALLAS) and rows[0].hops == 3
    assert all(r.nodes[0].position == 3 and r.nodes[0].key in at_pos3[_name(world, r.prompt_id)] for r in rows)
    assert {r.source_key for r in rows} >= {world.key(DALLAS), world.key(TEXAS)}
    # The same as the feature-sourced query restricted to those activations: Dallas sits only at position 3.
    by_feature = q.paths_to_logits([world.key(DALLAS)], [" Austin"], max_hops=3, min_abs_weight=0.05, limit=200)
    assert sorted((r.prompt_id, r.weights) for r in rows if r.source_key == world.key(DALLAS)) == sorted(
        (r.prompt_id, r.weights) for r in by_feature.rows
    )
    both = q.paths_to_logits(["Texas"], [" Austin"], max_hops=3, at_token="w3", model=world.model).rows
    assert both and {r.source_key for r in both} == {world.key(TEXAS)}
    with pytest.raises(QueryError, match="give source features, an input token"):
        q.paths_to_logits(None, [" Austin"])
    with pytest.raises(QueryError, match="unknown token"):
        q.paths_to_logits(None, [" Austin"], at_token=f"no-such-token-{world.tag}")
    with pytest.raises(QueryError, match="non-empty"):
        q.features_on_token("  ")


def _name(world: World, prompt_id: str) -> str:
    return next(name for name, spec in world.specs.items() if spec.pid == prompt_id)


def test_top_features_for_logit_aggregate_and_evidence(q: AtlasQueries, world: World) -> None:
    result = q.top_features_for_logit(" Austin", model=world.model, evidence=2)
    check_result(result)
    by_key = {r.feature_key: r for r in result.rows}
    capital = by_key[world.key(CAPITAL)]
    assert result.rows[0].feature_key == world.key(CAPITAL)  # 5 x 0.7 beats Dallas's 5 x 0.3
    assert capital.n_prompts == 5 and capital.n_edges == 5 and capital.label == "say a capital"
    assert capital.sum_weight == pytest.approx(5 * float(np.float32(W_CA)), abs=1e-9)
    assert capital.mean_weight == pytest.approx(float(np.float32(W_CA)), abs=1e-9)
    assert capital.max_abs_weight == float(np.float32(W_CA))
    assert len(capital.evidence) == 2 and all(e.weight == float(np.float32(W_CA)) for e in capital.evidence)
    assert by_key[world.key(DALLAS)].n_prompts == 5 and by_key[world.key(DALLAS)].sum_weight == pytest.approx(1.5)
    assert [r.feature_key for r in q.top_features_for_logit(" Austin", model=world.model, min_prompts=6).rows] == []
    with pytest.raises(QueryError, match="unknown token"):
        q.top_features_for_logit("no-such-token-xyz")


def test_neighbourhood_aggregated_and_per_prompt(q: AtlasQueries, world: World) -> None:
    down = q.neighbourhood(world.key(TEXAS), "down")
    check_result(down)
    assert down.rows[0].key == world.key(CAPITAL) and down.rows[0].n_prompts == 5
    assert down.rows[0].weight == pytest.approx(5 * float(np.float32(W_TC)))
    assert {r.key for r in down.rows} == {world.key(CAPITAL), f"{world.model}/{SACRAMENTO}"}
    up = q.neighbourhood("Texas", "up")
    assert [r.key for r in up.rows] == [world.key(DALLAS)]
    assert up.rows[0].weight == pytest.approx(sum(float(np.float32(W_DT * k)) for k in PLANT_SCALE.values()))
    assert up.rows[0].max_abs_weight == float(np.float32(W_DT * 1.2))
    per = q.neighbourhood(world.key(CAPITAL), "down", prompt_id=world.pid("c1"))
    assert [(r.kind, r.text, r.weight) for r in per.rows] == [
        ("logit", " the", 2.0), ("logit", " Austin", float(np.float32(W_CA)))
    ]  # fmt: skip
    assert all(r.prompt_id == world.pid("c1") and r.position == 5 for r in per.rows)
    per_up = q.neighbourhood(world.key(DALLAS), "up", prompt_id=world.pid("c0"))
    assert per_up.rows == ()  # nothing drives the planted Dallas feature
    with pytest.raises(QueryError, match="direction"):
        q.neighbourhood(world.key(TEXAS), "sideways")
    with pytest.raises(QueryError, match="unknown prompt"):
        q.neighbourhood(world.key(TEXAS), "down", prompt_id="no-such-prompt")


def test_prompts_where_feature_matters(q: AtlasQueries, world: World) -> None:
    by_act = q.prompts_where_feature_matters(world.key(DALLAS), by="activation")
    check_result(by_act)
    expected = [world.pid(n) for n, _ in sorted(PLANT_SCALE.items(), key=lambda kv: -kv[1])]
    assert [r.prompt_id for r in by_act.rows] == expected
    assert by_act.rows[0].max_activation == pytest.approx(2.4) and by_act.rows[0].positions == (3,)
    assert all(r.task == "capitals" for r in by_act.rows)
    by_infl = q.prompts_where_feature_matters(world.key(DALLAS), by="influence")
    assert [r.prompt_id for r in by_infl.rows] == [
        world.pid(n) for n, _ in sorted(PLANT_SCALE.items(), key=lambda kv: kv[1])
    ]
    by_weight = q.prompts_where_feature_matters(world.key(DALLAS), by="weight", limit=1)
    assert [r.prompt_id for r in by_weight.rows] == [world.pid("c2")]
    assert by_weight.rows[0].out_abs_weight == pytest.approx(float(np.float32(W_DT * 1.2)) + 0.3 + 0.6, abs=1e-6)
    with pytest.raises(QueryError, match="by must be one of"):
        q.prompts_where_feature_matters(world.key(DALLAS), by="vibes")
    with pytest.raises(QueryError, match="unknown feature"):
        q.prompts_where_feature_matters(f"{world.transcoder}/77/77")


def test_shared_subgraph(q: AtlasQueries, world: World) -> None:
    pids = [world.pid("c0"), world.pid("c1"), world.pid("o0")]
    result = q.shared_subgraph(pids, min_prompts=2)
    graph = result.single
    keys = {n.key for n in graph.nodes}
    planted = {world.key(DALLAS), world.key(TEXAS), world.key(CAPITAL)}
    assert planted <= keys
    # Independent count of what should be shared: identities occurring in >= 2 of the three prompts.
    occurrences: dict[str, set[str]] = {}
    for name in ("c0", "c1", "o0"):
        nodes = world.graphs[name][1]
        for kind, fk, tid in zip(*(nodes.column(c).to_pylist() for c in ("kind", "feature_key", "token_id")),
                                 strict=True):  # fmt: skip
            if kind == "feature":
                occurrences.setdefault(fk, set()).add(name)
            elif kind == "logit":
                occurrences.setdefault(f"{world.model}/{tid}", set()).add(name)
    assert keys == {k for k, v in occurrences.items() if len(v) >= 2}
    edges = {(graph.nodes[e.source].key, graph.nodes[e.target].key): e for e in graph.edges}
    assert edges[(world.key(DALLAS), world.key(TEXAS))].n_prompts == 2
    assert edges[(world.key(DALLAS), world.key(TEXAS))].weight == pytest.approx(
        float(np.float32(W_DT)) + float(np.float32(W_DT * 0.9))
    )
    assert all(e.n_prompts >= 2 for e in graph.edges)
    assert {n.key: n.prompt_ids for n in graph.nodes}[world.key(TEXAS)] == tuple(sorted(pids[:2]))
    assert q.shared_subgraph(pids, min_prompts=3).single.nodes != ()  # " Austin" and " the" are in all three
    with pytest.raises(QueryError, match="min_prompts must be between 1 and 3"):
        q.shared_subgraph(pids, min_prompts=4)
    with pytest.raises(QueryError, match="unknown prompt"):
        q.shared_subgraph([*pids, "nope"], min_prompts=2)


def test_prompt_graph_and_overview(q: AtlasQueries, world: World) -> None:
    meta, nodes, edges = world.graphs["c2"]
    graph = q.prompt_graph(meta["id"]).single
    assert [n.node_index for n in graph.nodes] == nodes.column("node_index").to_pylist()
    assert [n.kind for n in graph.nodes] == nodes.column("kind").to_pylist()
    assert {(e.source, e.target, e.weight) for e in graph.edges} == set(
        zip(*(edges.column(c).to_pylist() for c in ("source", "target", "weight")), strict=True)
    )
    assert graph.prompt["task"] == "capitals" and graph.prompt["n_edges"] == edges.num_rows
    strong = q.prompt_graph(meta["id"], min_abs_weight=0.5, max_edges=3).single
    assert len(strong.edges) == 3 and strong.edges[0].weight == 2.0
    with pytest.raises(QueryError, match="unknown prompt"):
        q.prompt_graph("no-such-prompt")

    ov = q.overview().single
    assert world.model in ov.models and world.transcoder in ov.transcoders and "run-q" in ov.runs
    tasks = dict(ov.prompts_by_task)
    assert tasks["capitals"] >= 5 and tasks["other"] >= 2
    assert ov.prompts >= 7 and ov.edges >= sum(g[2].num_rows for g in world.graphs.values())
    assert ov.agg_edges > 0 and ov.schema_version is not None
    listed = q.list_prompts(task="capitals", contains=world.tag).rows
    assert [p.prompt_id for p in listed] == sorted(world.pid(n) for n in PLANT_SCALE)
    by_id = q.list_prompts(prompt_ids=[world.pid("o1"), world.pid("c0"), "no-such-prompt"]).rows
    assert [p.prompt_id for p in by_id] == sorted([world.pid("o1"), world.pid("c0")])


def test_find_features_by_key_label_and_top_token(
    q: AtlasQueries, world: World, tmp_path: Path, neo4j_driver: Driver, neo4j_connection: Neo4jConnection
) -> None:
    by_key = q.find_features(world.key(TEXAS)).rows
    assert by_key[0].key == world.key(TEXAS) and by_key[0].matched_on == "key" and by_key[0].n_activations == 5
    # Other tests' dictionaries in the shared server carry automatic labels that may say "Dallas" too: this world's
    # dictionary must contribute exactly its Dallas feature.
    by_label = q.find_features("dallas", limit=MAX_LIMIT).rows
    assert [(m.key, m.matched_on) for m in by_label if m.transcoder == world.transcoder] == [
        (world.key(DALLAS), "label")
    ]
    assert q.find_features(f"no-such-{world.tag}").rows == ()
    with pytest.raises(QueryError, match="non-empty"):
        q.find_features("  ")

    # Top token through DuckDB: the stats store says the capital feature promotes " Austin".
    effects = pa.Table.from_pydict({
        "transcoder_id": [world.transcoder] * 2, "layer": [CAPITAL[0], 1], "feature": [CAPITAL[1], 999],
        "sign": ["positive", "negative"], "rank": [0, 0], "token_id": [AUSTIN, AUSTIN], "token": [" Austin"] * 2,
        "effect": [3.5, -2.0],
    })  # fmt: skip
    store = FeatureStatsStore(tmp_path / "stats.duckdb")
    store.ingest([], logit_effects=effects)
    with_stats = AtlasQueries(neo4j_driver, neo4j_connection.database, stats=store)
    hits = with_stats.find_features("Austin").rows
    assert [(m.key, m.matched_on) for m in hits] == [(world.key(CAPITAL), "top_token")]
    paths = with_stats.paths_to_logits(["Austin"], [" Austin"], max_hops=1).rows
    assert paths and all(r.source_key == world.key(CAPITAL) for r in paths)


def test_server_down_is_a_clear_error() -> None:
    port = free_loopback_port()
    uri = f"bolt://127.0.0.1:{port}"
    driver = GraphDatabase.driver(uri, auth=("neo4j", "x"), max_transaction_retry_time=1.0, connection_timeout=2.0)
    with driver, pytest.raises(StoreUnavailableError, match="unreachable"):
        AtlasQueries(driver).overview()


def test_results_are_typed_and_frozen(q: AtlasQueries, world: World) -> None:
    result = q.paths_to_logits([world.key(DALLAS)], [" Austin"], max_hops=1)
    with pytest.raises(AttributeError):
        result.rows[0].strength = 0.0  # type: ignore[misc]
    assert isinstance(result.rows, tuple) and isinstance(result.rows[0].nodes, tuple)
    assert result.params["sources"] == [world.key(DALLAS)] and "{1,1}" in result.cypher


def test_cli_paths_from_an_input_token(
    world: World, neo4j_connection: Neo4jConnection, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from atlas_cli.main import app

    for name, value in (("NEO4J_URI", neo4j_connection.uri), ("NEO4J_USER", neo4j_connection.user),
                        ("NEO4J_PASSWORD", neo4j_connection.password), ("NEO4J_DATABASE", neo4j_connection.database),
                        ("ATLAS_STATS_DB", str(tmp_path / "none.duckdb")), ("COLUMNS", "200")):  # fmt: skip
        monkeypatch.setenv(name, value)
    args = ["paths", "--at-token", "w3", "--target", " Austin", "--min-weight", "0.05", "--model", world.model]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"L{DALLAS[0]}/{DALLAS[1]}@3 → L{TEXAS[0]}/{TEXAS[1]}@3 → L{CAPITAL[0]}/{CAPITAL[1]}@5 → ' Austin'" in (
        result.output
    )
    assert "features active on 'w3'" in result.output and "what the paths pass through" in result.output
    # the intermediates are named by their labels too (Texas is the only intermediate of the planted paths)
    middle = result.output.split("what the paths pass through", 1)[1]
    assert any(f"L{TEXAS[0]}/{TEXAS[1]}" in line and "Texas" in line for line in middle.splitlines())
    missing = CliRunner().invoke(app, ["paths", "--target", " Austin"])
    assert missing.exit_code == 2 and "give --feature, --at-token, or both" in missing.output
