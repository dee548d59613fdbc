"""Pruned graphs export to circuit-tracer's graph JSON and to the Parquet tables storage reads."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from atlas.attribution.engine import attribute
from atlas.attribution.export import prompt_id, prune_graph, write_circuit_tracer_json, write_parquet
from atlas.attribution.graph import EDGE_SCHEMA, NODE_SCHEMA
from atlas.models import load_model
from atlas.transcoders import TranscoderSpec, build_transcoder


@pytest.fixture(scope="module")
def pruned():  # type: ignore[no-untyped-def]
    model = load_model("tiny-llama")
    torch.manual_seed(3)
    transcoder = build_transcoder(TranscoderSpec(kind="clt", n_layers=2, d_model=32, n_features=32))
    with torch.no_grad():
        transcoder.b_enc.fill_(0.2)
        transcoder.W_dec[0].mul_(20)
        transcoder.W_dec[1].mul_(20)
    graph = attribute(model, transcoder, "When Mary and John went to the store", transcoder_id="tiny-clt")
    return prune_graph(graph)


def test_pruning_shrinks_the_graph_and_scores_it(pruned) -> None:  # type: ignore[no-untyped-def]
    graph = pruned.graph
    assert 0 < pruned.n_nodes < graph.index.n_nodes
    assert 0 < pruned.n_edges < graph.edges.weight.numel()
    for scores in (pruned.scores_unpruned, pruned.scores_pruned):
        assert 0.0 <= scores.replacement <= 1.0 and 0.0 <= scores.completeness <= 1.0


def test_circuit_tracer_json(pruned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_circuit_tracer_json(pruned, tmp_path / "g.json", slug="ioi")
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert data["metadata"]["schema_version"] == 1 and data["metadata"]["slug"] == "ioi"
    ids = [node["node_id"] for node in data["nodes"]]
    assert len(ids) == len(set(ids))
    assert {link["source"] for link in data["links"]} | {link["target"] for link in data["links"]} <= set(ids)
    kinds = {node["feature_type"] for node in data["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    errors = [node for node in data["nodes"] if node["feature_type"] == "mlp reconstruction error"]
    assert all(node["node_id"].split("_")[1] == "-1" for node in errors)
    logits = [node for node in data["nodes"] if node["feature_type"] == "logit"]
    assert logits[0]["is_target_logit"] and logits[0]["layer"] == "3"
    assert len(data["links"]) == pruned.n_edges


def test_parquet_tables_follow_the_storage_schema(pruned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nodes_path, edges_path = write_parquet(pruned, tmp_path)
    nodes, edges = pq.read_table(nodes_path), pq.read_table(edges_path)
    assert nodes.schema.equals(NODE_SCHEMA, check_metadata=False)
    assert edges.schema.equals(EDGE_SCHEMA, check_metadata=False)
    assert nodes.num_rows == pruned.n_nodes and edges.num_rows == pruned.n_edges
    kept = set(nodes.column("node_index").to_pylist())
    assert set(edges.column("source").to_pylist()) | set(edges.column("target").to_pylist()) <= kept
    features = nodes.filter(pq.read_table(nodes_path).column("kind").to_numpy() == "feature")
    assert all(key.startswith("tiny-clt/") for key in features.column("feature_key").to_pylist())
    assert set(nodes.column("prompt_id").to_pylist()) == {prompt_id(pruned.graph)}


def test_cli_attribute_writes_json_and_parquet(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from atlas.transcoders import save_transcoder
    from atlas_cli.main import app

    torch.manual_seed(0)
    transcoder = build_transcoder(TranscoderSpec(kind="plt", n_layers=2, d_model=32, n_features=16))
    with torch.no_grad():
        transcoder.b_enc.fill_(0.2)
    directory = save_transcoder(transcoder, tmp_path / "tc", model_name="tiny-llama")
    args = [
        "attribute",
        "--prompt",
        "Mary and John",
        "--transcoders",
        str(directory),
        "--model",
        "tiny-llama",
        "--target",
        "M",
        "--target",
        "J",
        "--json",
        str(tmp_path / "g.json"),
        "--parquet",
        str(tmp_path / "pq"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "g.json").read_text())
    assert [n["clerp"].split('"')[1] for n in data["nodes"] if n["feature_type"] == "logit"] == ["M", "J"]
    assert (tmp_path / "pq" / "edges.parquet").exists()
    bad = CliRunner().invoke(app, [*args[:7], "--target", "Mary"])
    assert bad.exit_code == 2
    assert "not a single token" in bad.output
