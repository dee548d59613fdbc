"""The app's pure logic: read-only Cypher validation, graph layout and figure, input parsing, data shaping,
intervention picks and settings; plus the console runner's server-side timeout and row cap on a real Neo4j."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from neo4j import Driver

from app.config import ConfigError, environment_for, load_config
from app.cypher import CypherError, CypherRejected, ResultGraph, check_read_only, run_read_query, strip_literals
from app.interventions import (
    FeaturePick,
    build_interventions,
    pick_from_node_id,
    pick_from_reference,
    resolve_runtime,
)
from app.layout import (
    GraphEdge,
    GraphNode,
    _hover,
    figure,
    filter_nodes,
    layered_layout,
    neighbours,
    position_spans,
    selected_node,
    subgraph,
    width_bucket,
)
from app.shaping import (
    InputError,
    highlighted_tokens_html,
    histogram_rows,
    merged_path_graph,
    parse_list,
    parse_positions,
    path_rows,
    per_prompt_summary,
    probability_changes,
    result_graph_drawable,
)
from atlas.storage.queries import LogitPath, PathNode

READS = [
    "MATCH (n) RETURN n LIMIT 5",
    "match (p:Prompt {text: 'CREATE a DELETE b'}) return p",  # keywords inside strings
    'MATCH (n) WHERE n.text = "SET x; DROP y" RETURN n.set, n.delete',  # strings, property names
    "RETURN {delete: 1, merge: 2} AS m",  # map keys
    "MATCH (n:`CREATE`) RETURN n",  # back-quoted name
    "// DELETE everything\nMATCH (n) RETURN count(n) /* CREATE */",
    "CALL db.labels()",
    "CALL db.schema.visualization()",
    "CALL () { MATCH (p:Prompt) RETURN count(p) AS n } RETURN n",
    "MATCH (n) RETURN n;",
    "MATCH (n:Settings) RETURN n.created_at, n.offset",  # words that contain keywords
]
WRITES = [
    ("CREATE (n:X)", "CREATE"),
    ("create (n:X)", "CREATE"),
    ("MERGE (n:X {id: 1})", "MERGE"),
    ("MATCH (n) DELETE n", "DELETE"),
    ("MATCH (n) DETACH DELETE n", "DETACH"),
    ("MATCH (n) SET n.x = 1", "SET"),
    ("MATCH (n) REMOVE n.x", "REMOVE"),
    ("DROP INDEX foo", "DROP"),
    ("DROP CONSTRAINT atlas_prompt_id", "DROP"),
    ("LOAD CSV FROM 'file:///x.csv' AS row RETURN row", "LOAD CSV"),
    ("MATCH (n) FOREACH (x IN [1] | SET n.y = x)", "FOREACH"),
    ("CALL dbms.components()", "dbms"),
    ("CALL dbms.security.createUser('a', 'b')", "dbms"),
    ("call  DBMS . listConfig()", "dbms"),
    ("CALL apoc.create.node(['X'], {})", "apoc.create.node"),
    ("CALL apoc.periodic.iterate('MATCH (n) RETURN n', 'DELETE n', {})", "apoc.periodic.iterate"),
    ("CALL db.createLabel('X')", "db.createLabel"),
    ("CALL { MATCH (n) RETURN n } IN TRANSACTIONS RETURN 1", "TRANSACTIONS"),
    ("MATCH (n) RETURN n; MATCH (m) RETURN m", "one statement"),
    ("USE system SHOW USERS", "USE"),
    ("", "empty"),
]


@pytest.mark.parametrize("query", READS)
def test_read_queries_pass(query: str) -> None:
    assert check_read_only(query) == query.strip().rstrip(";")


@pytest.mark.parametrize(("query", "word"), WRITES)
def test_write_and_admin_queries_are_rejected_with_a_reason(query: str, word: str) -> None:
    with pytest.raises(CypherRejected, match=word):
        check_read_only(query)


def test_strip_literals_blanks_strings_and_drops_comments() -> None:
    assert strip_literals("RETURN 'a;b', \"c\" // x\n, `d e`") == "RETURN      ,     \n,      "
    assert "DELETE" not in strip_literals("RETURN 'it\\'s DELETE'")


def test_console_runner_caps_rows_and_times_out_on_the_server(neo4j_driver: Driver) -> None:
    result = run_read_query(neo4j_driver, "UNWIND range(1, 50) AS x RETURN x", row_cap=10)
    assert [r["x"] for r in result.rows] == list(range(1, 11)) and result.truncated
    full = run_read_query(neo4j_driver, "UNWIND range(1, 5) AS x RETURN x", row_cap=10)
    assert len(full.rows) == 5 and not full.truncated
    slow = "UNWIND range(1, 200000000) AS x WITH x WHERE x % 7 = 3 RETURN count(x) AS n"
    with pytest.raises(CypherError, match="timeout"):
        run_read_query(neo4j_driver, slow, timeout_s=0.5)
    with pytest.raises(CypherRejected):
        run_read_query(neo4j_driver, "CREATE (n:ShouldNotExist) RETURN n")
    assert neo4j_driver.execute_query("MATCH (n:ShouldNotExist) RETURN count(n) AS n").records[0]["n"] == 0


def test_console_runner_collects_paths_as_a_graph(neo4j_driver: Driver) -> None:
    query = "WITH 1 AS x MATCH p = (a)-[r]->(b) RETURN p LIMIT 3"
    result = run_read_query(neo4j_driver, query)
    for row in result.rows:
        assert "-[:" in row["p"]
    assert len(result.graph.relationships) == len(result.rows)


def node(index: int, kind: str, layer: int | None, position: int, influence: float | None = None) -> GraphNode:
    return GraphNode(index, f"n{index}", kind, layer, position, f"label{index}", influence=influence)


NODES = [
    node(0, "feature", 0, 1, 0.1),
    node(1, "feature", 0, 1, 0.5),
    node(2, "feature", 1, 2, 0.9),
    node(3, "error", 1, 2, 0.2),
    node(4, "token", None, 0),
    node(5, "token", None, 1),
    node(6, "token", None, 2),
    node(7, "logit", None, 2),
]
EDGES = [GraphEdge(4, 0, 0.5), GraphEdge(5, 1, -0.25), GraphEdge(0, 2, 1.0), GraphEdge(2, 7, 2.0), GraphEdge(3, 7, -4)]


def test_layered_layout_puts_tokens_low_layers_up_and_logits_on_top() -> None:
    pos = layered_layout(NODES)
    assert {pos[i][1] for i in (4, 5, 6)} == {0.0}
    assert pos[0][1] == pos[1][1] == 1.0 and pos[2][1] == pos[3][1] == 2.0
    assert pos[7][1] == 3.0  # two layers: logits on row L + 1
    spans = position_spans(NODES)
    assert [round(w, 6) for _, w in spans.values()] == [1.0, 2.0, 2.0]  # widest row per position: 1, 2, 2 nodes
    starts = [start for start, _ in spans.values()]
    assert all(a + w < b for (a, w), b in zip(list(spans.values())[:-1], starts[1:], strict=True))  # no overlap
    for n in NODES:  # every node inside its position's span
        start, width = spans[n.position]
        assert start < pos[n.index][0] < start + width
    # nodes of one cell spread across it, most influential (lowest cumulative influence) first
    assert pos[0][0] < pos[1][0] and pos[3][0] < pos[2][0]
    assert len(set(pos.values())) == len(NODES)


def test_filters_subgraph_and_neighbours() -> None:
    kept, kept_edges = filter_nodes(NODES, EDGES, max_influence=0.3)
    assert {n.index for n in kept} == {0, 3, 4, 5, 6, 7}
    assert {(e.source, e.target) for e in kept_edges} == {(4, 0), (3, 7)}
    sub_nodes, sub_edges = subgraph(NODES, EDGES, [0, 2, 7])
    assert [n.index for n in sub_nodes] == [0, 2, 7] and len(sub_edges) == 2
    incoming, outgoing = neighbours(EDGES, 7)
    assert [e.source for e in incoming] == [3, 2] and outgoing == []


def test_width_buckets_and_figure_traces() -> None:
    assert width_bucket(0.0, 4.0) == 0 and width_bucket(4.0, 4.0) == 3 and width_bucket(-2.1, 4.0) == 2
    assert width_bucket(1.0, 0.0) == 0
    fig = figure(NODES, EDGES, tokens=["a", "b", "c"], highlight=[2])
    lines = [t for t in fig.data if t.mode == "lines"]
    markers = [t for t in fig.data if t.mode != "lines"]
    colours = {t.line.color for t in lines}
    assert len(colours) == 2  # positive and negative edges
    assert sum(len([x for x in t.x if x is not None]) for t in lines) == 2 * len(EDGES)
    assert [t.name for t in markers] == ["token", "feature", "error", "logit"]
    feature_trace = markers[1]
    assert list(feature_trace.customdata) == [0, 1, 2]
    assert list(feature_trace.marker.size) == [10, 10, 16]  # the highlighted node is larger
    assert list(fig.layout.yaxis.ticktext) == ["tokens", "L0", "L1", "logits"]


def test_selected_node_reads_plotly_events() -> None:
    assert selected_node({"selection": {"points": [{"customdata": 7}]}}) == 7
    assert selected_node({"selection": {"points": [{"customdata": [3]}]}}) == 3
    assert selected_node({"selection": {"points": []}}) is None
    assert selected_node(None) is None


def test_parse_positions_and_lists() -> None:
    assert parse_positions("all", 5) == slice(0, None)
    assert parse_positions("3:", 5) == slice(3, None)
    assert parse_positions("1, 3-4, -1", 6) == [1, 3, 4, 5]
    with pytest.raises(InputError, match="outside"):
        parse_positions("9", 5)
    with pytest.raises(InputError, match="not a position"):
        parse_positions("x", 5)
    assert parse_list(" Paris, London\nBerlin,,Paris ") == ["Paris", "London", "Berlin"]


def test_highlighted_tokens_escape_html_and_shade_by_activation() -> None:
    out = highlighted_tokens_html(["<script>", "b"], [0.0, 2.0], max_value=2.0, focus=1)
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert "rgba(249, 115, 22, 0.00)" in out and "rgba(249, 115, 22, 1.00)" in out and "outline" in out


def test_histogram_rows_use_bin_bounds() -> None:
    rows = histogram_rows([{"bin": 2, "count": 5}, {"bin": 1, "count": 3}], lambda b: (b * 1.0, b * 2.0))
    assert [(r["low"], r["high"], r["count"]) for r in rows] == [(1.0, 2.0, 3), (2.0, 4.0, 5)]


def test_probability_changes_cover_top_tokens_and_largest_changes() -> None:
    before = torch.tensor([3.0, 1.0, 0.0, -5.0, -6.0])
    after = torch.tensor([3.0, 1.0, 0.0, 2.5, -6.0])
    rows = probability_changes(before, after, lambda i: f"t{i}", top=2)
    by_id = {r.token_id: r for r in rows}
    assert set(by_id) == {0, 1, 3}  # top 2 before {0, 1}, after {0, 3}, largest changes {3, 0}
    p0, p1 = before.softmax(-1), after.softmax(-1)
    assert by_id[0].before == pytest.approx(float(p0[0])) and by_id[0].after == pytest.approx(float(p1[0]))
    assert by_id[3].delta == pytest.approx(float(p1[3] - p0[3])) and by_id[3].delta > 0
    assert [r.token_id for r in rows] == [0, 3, 1]  # by the larger of the two probabilities


def path(pid: str, feature_keys: list[str], target: str, weights: list[float]) -> LogitPath:
    nodes = [PathNode("feature", f"{i}_{k[-1]}_3", i, 3, i, k, None, 1.0) for i, k in enumerate(feature_keys)]
    nodes.append(PathNode("logit", "9_1_3", 9, 3, None, "m/1", target, 0.5))
    strength = 1.0
    for w in weights:
        strength *= w
    return LogitPath(pid, feature_keys[0], target, strength, min(map(abs, weights)), len(weights), tuple(nodes),
                     tuple(weights))  # fmt: skip


def test_merged_path_graph_joins_features_across_prompts_and_sums_weights() -> None:
    paths = [path("p1", ["t/0/1", "t/1/2"], "x", [0.5, 2.0]), path("p2", ["t/0/1", "t/1/2"], "x", [0.25, 1.0])]
    nodes, edges = merged_path_graph(paths)
    assert [n.feature_key for n in nodes if n.kind == "feature"] == ["t/0/1", "t/1/2"]
    assert len([n for n in nodes if n.kind == "logit"]) == 1
    assert sorted(e.weight for e in edges) == [0.75, 3.0]
    summary = per_prompt_summary(paths)
    assert [r["prompt"] for r in summary] == ["p1", "p2"] and summary[0]["best |strength|"] == 1.0


def test_labels_lead_where_features_are_shown() -> None:
    """A labelled feature shows its label (key still there) in the path rows, the merged graph, hover and the
    console's result graph; an unlabelled one falls back to its key or node id."""
    labelled = path("p1", ["t/0/1", "t/1/2"], " x", [0.5, 2.0])
    first = labelled.nodes[0]
    nodes = (dataclasses.replace(first, text="Dallas → Texas"), *labelled.nodes[1:])
    labelled = dataclasses.replace(labelled, nodes=nodes)
    (row,) = path_rows([labelled])
    assert row["source"] == "t/0/1" and row["source label"] == "Dallas → Texas"
    assert row["path labels"] == "Dallas → Texas → 1_2_3 → ' x'" and row["path"] == "0_1_3 → 1_2_3 → 9_1_3"
    merged, _ = merged_path_graph([labelled])
    assert [(n.label, n.feature_key) for n in merged if n.kind == "feature"] == [("Dallas → Texas", "t/0/1"),
                                                                               ("t/1/2", "t/1/2")]  # fmt: skip
    hover = _hover(merged[0])
    assert hover.index("Dallas → Texas") < hover.index("feature t/0/1")
    assert "<b>t/1/2</b>" not in _hover(merged[1])  # no label: the key once, not twice
    graph = ResultGraph(
        nodes={"a": {"labels": ["Feature"], "properties": {"key": "t/0/1", "label": "Dallas <city>", "layer": 0}}},
        relationships={},
    )
    (node,), _ = result_graph_drawable(graph)
    assert node.label == "Dallas <city>" and node.feature_key == "t/0/1"
    assert "Dallas &lt;city&gt;" in _hover(node)  # escaped for Plotly's HTML hover


def test_intervention_picks_and_edits() -> None:
    assert pick_from_node_id("3_17_5") == FeaturePick(3, 17, 5)
    assert pick_from_reference("tc/x/2/9") == FeaturePick(2, 9, None)
    assert pick_from_reference("L4#11") == FeaturePick(4, 11, None)
    with pytest.raises(InputError):
        pick_from_node_id("E_12_3")
    edits = build_interventions([FeaturePick(1, 2, 3)], None, "scale", 2.0)
    assert [(e.layer, e.feature, e.position, e.operation, e.value) for e in edits] == [(1, 2, 3, "scale", 2.0)]
    edits = build_interventions([FeaturePick(1, 2, 3), FeaturePick(0, 5, None)], [0, 4], "ablate", 0.0)
    assert [(e.layer, e.position) for e in edits] == [(1, 0), (1, 4), (0, 0), (0, 4)]
    assert build_interventions([FeaturePick(0, 5, None)], slice(2, None), "add", 1.0)[0].position == slice(2, None)
    with pytest.raises(InputError, match="no position"):
        build_interventions([FeaturePick(0, 5, None)], None, "set", 1.0)
    with pytest.raises(InputError, match="unknown operation"):
        build_interventions([FeaturePick(0, 5, 1)], None, "double", 1.0)


def test_resolve_runtime_prefers_flag_then_prompt_directory(tmp_path: Path) -> None:
    assert resolve_runtime("tiny-gpt2", None, default_model="m", transcoders=tmp_path) == ("tiny-gpt2", tmp_path)
    assert resolve_runtime("", str(tmp_path), default_model="m", transcoders=None) == ("m", tmp_path)
    with pytest.raises(InputError, match="--transcoders"):
        resolve_runtime("x", "not-a-dir", default_model="m", transcoders=None)
    with pytest.raises(InputError, match="does not exist"):
        resolve_runtime("x", None, default_model="m", transcoders=tmp_path / "missing")
    # weights-keyed ids: the dictionary from a recorded source, the model from a recorded local name
    assert resolve_runtime("tiny-gpt2", "clt-0123456789abcdef", default_model="m", transcoders=None,
                           transcoder_sources=["/gone", str(tmp_path)]) == ("tiny-gpt2", tmp_path)  # fmt: skip
    assert resolve_runtime("hf-0123456789abcdef", None, default_model="m", transcoders=tmp_path,
                           model_names=["/gone", str(tmp_path)]) == (str(tmp_path), tmp_path)  # fmt: skip
    with pytest.raises(InputError, match="local directory"):
        resolve_runtime("hf-0123456789abcdef", None, default_model="m", transcoders=tmp_path, model_names=["/gone"])


def test_config_from_environment(tmp_path: Path) -> None:
    env = environment_for(neo4j_uri="bolt://h:1", stats_db=tmp_path / "s.duckdb", model="tiny-gpt2",
                          transcoders=tmp_path)  # fmt: skip
    cfg = load_config({**env, "NEO4J_PASSWORD": "pw", "ATLAS_ROW_CAP": "50"})
    assert (cfg.neo4j_uri, cfg.neo4j_password, cfg.stats_db, cfg.model, cfg.transcoders, cfg.row_cap) == (
        "bolt://h:1", "pw", tmp_path / "s.duckdb", "tiny-gpt2", tmp_path, 50,
    )  # fmt: skip
    assert load_config({}).neo4j_uri is None  # the managed local server
    assert load_config({"NEO4J_URI": "neo4j://x:7687"}).neo4j_uri == "neo4j://x:7687"
    with pytest.raises(ConfigError, match="bolt"):
        load_config({"ATLAS_NEO4J_URI": "http://x"})
    with pytest.raises(ConfigError, match="ATLAS_QUERY_TIMEOUT_S"):
        load_config({"ATLAS_QUERY_TIMEOUT_S": "-1"})
