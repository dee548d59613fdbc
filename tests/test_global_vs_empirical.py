"""Global vs empirical: Spearman by hand, the pair join, and `atlas global compare` on a real store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from neo4j import Driver
from typer.testing import CliRunner

from atlas.analysis.global_vs_empirical import compare, parse_feature_key, ranks, spearman
from atlas.attribution.engine import AttributionConfig, attribute
from atlas.models import load_model
from atlas.storage.aggregate import aggregate_rows
from atlas.storage.global_weights import feature_rows, stored_pairs
from atlas.storage.neo4j_server import Neo4jConnection
from atlas.storage.neo4j_writer import GraphWriter
from atlas.transcoders import save_transcoder, transcoder_identity
from atlas_cli.main import app
from tests.test_attribution import random_transcoder


def test_ranks_average_ties() -> None:
    assert ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_by_hand() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # no ties: rho = 1 − 6 Σ d² / (n (n² − 1)); ranks x 1..5, y 2,1,4,3,5 → Σ d² = 4 → 1 − 24/120 = 0.8
    assert spearman([1, 2, 3, 4, 5], [0.2, 0.1, 0.4, 0.3, 0.5]) == pytest.approx(0.8)
    # monotone transforms do not change it
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    y = x + 0.5 * torch.randn(50, generator=torch.Generator().manual_seed(1))
    assert spearman(x, y) == pytest.approx(spearman(x.exp(), y**3))
    assert math.isnan(spearman([1.0], [2.0])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal-length"):
        spearman([1, 2], [1, 2, 3])


def test_compare_joins_pairs_present_on_both_sides() -> None:
    a, b, c, d = (0, 1, 1, 2), (0, 1, 1, 3), (0, 2, 1, 2), (0, 3, 1, 0)
    result = compare([(a, 1.0, 0.5), (b, 2.0, None), (c, 3.0, 1.5), (d, -1.0, float("nan"))],
                     [(a, 0.1), (b, 0.3), (c, 0.2), ((1, 1, 2, 2), 9.0)])  # fmt: skip
    assert (result.n_global_pairs, result.n_empirical_pairs, result.n_matched, result.n_with_twera) == (4, 4, 3, 2)
    assert result.spearman_v == pytest.approx(spearman([0.1, 0.3, 0.2], [1.0, 2.0, 3.0]))
    assert result.spearman_twera == pytest.approx(1.0)
    assert parse_feature_key("clt-abc/3/17") == (3, 17)


def test_cli_compare_on_a_stored_corpus(
    tmp_path: Path, neo4j_driver: Driver, neo4j_connection: Neo4jConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graphs of a few prompts in Neo4j (AGG_EDGE maintained by the writer), global weights and TWERA in DuckDB:
    the command prints the Spearman values `compare` gives on the same rows read directly."""
    model = load_model("tiny-llama")
    transcoder = random_transcoder(model, "clt")
    directory = save_transcoder(transcoder, tmp_path / "clt", model_name="tiny-llama")
    transcoder_id = transcoder_identity(directory).id
    texts = ["When Mary and John went to the store", "the cat sat on the mat", "John gave a drink to Mary"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n")
    db = tmp_path / "stats.duckdb"
    for name, value in (("NEO4J_URI", neo4j_connection.uri), ("NEO4J_USER", neo4j_connection.user),
                        ("NEO4J_PASSWORD", neo4j_connection.password), ("NEO4J_DATABASE", neo4j_connection.database),
                        ("ATLAS_STATS_DB", str(db)), ("COLUMNS", "200")):  # fmt: skip
        monkeypatch.setenv(name, value)
    writer = GraphWriter(neo4j_driver, neo4j_connection.database)
    prompt_ids = [f"gw-{transcoder_id}-{i}" for i in range(len(texts))]
    graphs = []
    for pid, text in zip(prompt_ids, texts, strict=True):
        graph = attribute(model, transcoder, text, config=AttributionConfig(), transcoder_id=transcoder_id)
        nodes, edges = graph.to_tables(pid)
        meta = {"id": pid, "text": text, "model": "tiny-llama", "transcoder": transcoder_id, "run": "gw"}
        graphs.append((meta, nodes, edges))
    writer.write_prompts(graphs)
    try:
        runner = CliRunner()
        common = ["--transcoders", str(directory)]
        assert runner.invoke(app, ["global", "weights", *common, "--model", "tiny-llama", "--k", "24"]).exit_code == 0
        twera = runner.invoke(app, ["global", "twera", *common, "--model", "tiny-llama", "--corpus", str(corpus)])
        assert twera.exit_code == 0, twera.output
        result = runner.invoke(app, ["global", "compare", *common])
        assert result.exit_code == 0, result.output

        aggregates = [a for a in aggregate_rows(neo4j_driver, neo4j_connection.database, transcoder=transcoder_id)
                      if a.target_kind == "feature"]  # fmt: skip
        pairs = stored_pairs(db, transcoder_id).to_pylist()
        expected = compare(
            [((r["source_layer"], r["source"], r["target_layer"], r["target"]), r["v"], r["twera"]) for r in pairs],
            [((*parse_feature_key(a.source_key), *parse_feature_key(a.target_key)), a.mean_weight)
             for a in aggregates],
        )  # fmt: skip
        assert expected.n_matched >= 10 and expected.n_with_twera >= 10
        assert f"{expected.n_matched} pairs in both" in result.output
        assert f"Spearman(mean attribution, V) {expected.spearman_v:.3f}" in result.output
        assert f"with TWERA ({expected.n_with_twera} pairs) {expected.spearman_twera:.3f}" in result.output

        rows = feature_rows(db, transcoder_id)
        stored = {(r["layer"], r["feature"], r["partner_layer"], r["partner"]): r for r in rows}
        features = {parse_feature_key(r[0]) for r in neo4j_driver.execute_query(
            "MATCH (f:Feature {transcoder: $tc}) RETURN f.key", tc=transcoder_id,
            database_=neo4j_connection.database).records}  # fmt: skip
        linkable = [k for k in stored if k[:2] in features and k[2:] in features]
        assert linkable, "pairs between Features the prompts activated"
        for attempt in range(2):  # a re-run replaces, never duplicates
            pushed = runner.invoke(app, ["global", "neo4j", *common])
            assert pushed.exit_code == 0 and f"{len(linkable)} GLOBAL_WEIGHT" in pushed.output, pushed.output
            records = neo4j_driver.execute_query(
                "MATCH (f:Feature {transcoder: $tc})-[g:GLOBAL_WEIGHT]->(t:Feature) RETURN f.key AS s, t.key AS t, "
                "g.norm AS norm, g.rank AS rank, g.v AS v, g.twera AS twera, g.era AS era",
                tc=transcoder_id, database_=neo4j_connection.database,
            ).records  # fmt: skip
            assert len(records) == len(linkable), attempt
            for record in records:
                row = stored[(*parse_feature_key(record["s"]), *parse_feature_key(record["t"]))]
                assert record["norm"] == "fold"
                assert (record["rank"], record["v"], record["twera"], record["era"]) == (
                    row["rank"], row["v"], row["twera"], row["era"])  # fmt: skip
    finally:
        for pid in prompt_ids:
            writer.delete_prompt(pid)
        neo4j_driver.execute_query("MATCH (f:Feature {transcoder: $tc}) DETACH DELETE f", tc=transcoder_id,
                                   database_=neo4j_connection.database)  # fmt: skip
