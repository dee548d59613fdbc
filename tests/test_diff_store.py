"""Diffing in a real Neo4j and DuckDB: two models and three dictionaries in one store never mix; the planted
difference (model B = A with hop 2 rewired to read the token, features permuted) is found exactly and exceeds the
noise floor of a second dictionary of A's model; bad inputs are refused with nothing written.

Every graph is attributed, pruned and written as ingest writes it, under fresh names; the module deletes what it
wrote.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest
import torch
from neo4j import Driver
from planted_model import D_MLP, planted_hf_model, planted_model, planted_transcoder

from atlas.attribution.engine import attribute
from atlas.attribution.export import prune_graph
from atlas.attribution.targets import token_targets
from atlas.diff.align import AlignmentError
from atlas.diff.run import DiffInputError, Side, diff_stored, to_record
from atlas.models.tiny import tiny_tokenizer
from atlas.storage.diffs import DiffStore, DiffStoreError
from atlas.storage.neo4j_writer import GraphWriter
from atlas.storage.queries import AtlasQueries
from atlas.transcoders.activations import ActivationConfig
from atlas.transcoders.base import TranscoderSpec
from atlas.transcoders.io import save_transcoder
from atlas.transcoders.per_layer import PerLayerTranscoder

pytestmark = pytest.mark.usefixtures("neo4j_driver")

WITH_A = ["xyzA", "qA", "hello A"]  # the circuit runs here, so the rewiring shows
WITHOUT_A = ["abc", "xyz q"]
TEXTS = WITH_A + WITHOUT_A
ORDER = [[3, 0, 5, 1, 2, 4], [2, 4, 0, 5, 1, 3]]  # B's MLP slot of each of A's neurons


@dataclass
class World:
    a: Side
    b: Side
    ref: Side
    model_a: str
    model_b: str
    database: str
    prompts: dict[str, dict[str, str]]  # side → text → prompt id


def _noised(transcoder: PerLayerTranscoder, scale: float, seed: int) -> PerLayerTranscoder:
    """A second dictionary of the same model: the exact one with seeded noise on encoder and decoder."""
    copy = PerLayerTranscoder(transcoder.spec)
    copy.load_state_dict(transcoder.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (copy.W_enc, copy.W_dec):
            param.add_(scale * param.abs().max() * torch.randn(param.shape, generator=generator))
    return copy.eval()


def _write(writer: GraphWriter, side: Side, model_key: str, text: str, pid: str) -> None:
    model = side.model
    n_pos = len(text) + 1  # one character per token, BOS first
    targets = token_targets(["B"], model.model.W_U.detach().float(), model.tokenizer, n_pos - 1)
    graph = attribute(model, side.transcoder, text, targets=targets, transcoder_id=side.transcoder_id)
    pruned = prune_graph(graph)
    nodes, edges = graph.to_tables(pid, influence=pruned.result.cumulative_scores)
    nodes, edges = nodes.filter(pruned.result.node_mask.numpy()), edges.filter(pruned.result.edge_mask.numpy())
    writer.write_prompt({"id": pid, "text": text, "model": model_key, "transcoder": side.transcoder_id}, nodes, edges)


@pytest.fixture(scope="module")
def world(neo4j_driver: Driver, neo4j_connection: object) -> Iterator[World]:
    database = neo4j_connection.database  # type: ignore[attr-defined]
    tag = uuid.uuid4().hex[:10]
    model_a, model_b = planted_model(), planted_model(rewired=True, order=ORDER)
    tc_a = planted_transcoder(model_a)
    w = World(
        Side(f"diff-a-{tag}", model_a, tc_a),
        Side(f"diff-b-{tag}", model_b, planted_transcoder(model_b)),
        Side(f"diff-r-{tag}", model_a, _noised(tc_a, 0.02, seed=1)),
        f"diff-model-a-{tag}",
        f"diff-model-b-{tag}",
        database,
        {},
    )
    writer = GraphWriter(neo4j_driver, database)
    for name, side, model_key, texts in (("a", w.a, w.model_a, TEXTS), ("b", w.b, w.model_b, [*TEXTS, "only B"]),
                                         ("r", w.ref, w.model_a, TEXTS)):  # fmt: skip
        w.prompts[name] = {}
        for i, text in enumerate(texts):
            pid = f"test-diff-{tag}-{name}{i}"
            _write(writer, side, model_key, text, pid)
            w.prompts[name][text] = pid
    try:
        yield w
    finally:
        for texts in w.prompts.values():
            for pid in texts.values():
                writer.delete_prompt(pid)
        for query in ("MATCH (f:Feature) WHERE f.transcoder IN $tcs DETACH DELETE f",
                      "MATCH (t:Token) WHERE t.model IN $models DETACH DELETE t",
                      "MATCH (t:Transcoder) WHERE t.id IN $tcs DETACH DELETE t",
                      "MATCH (d:Diff) WHERE d.a IN $tcs DETACH DELETE d",
                      "MATCH (m:Model) WHERE m.name IN $models DETACH DELETE m"):  # fmt: skip
            neo4j_driver.execute_query(query, tcs=[w.a.transcoder_id, w.b.transcoder_id, w.ref.transcoder_id],
                                       models=[w.model_a, w.model_b], database_=database)  # fmt: skip


def _count(driver: Driver, database: str, cypher: str, **params: object) -> int:
    return int(driver.execute_query(cypher, database_=database, **params).records[0]["n"])


def test_two_models_and_dictionaries_in_one_store_never_mix(neo4j_driver: Driver, world: World) -> None:
    db, tcs = world.database, [world.a.transcoder_id, world.b.transcoder_id, world.ref.transcoder_id]
    # every activation's feature belongs to its prompt's dictionary, every token to its prompt's model
    assert (
        _count(
            neo4j_driver,
            db,
            "MATCH (p:Prompt)<-[:IN]-(:FeatureActivation)-[:OF]->(f:Feature) "
            "WHERE p.transcoder IN $tcs AND f.transcoder <> p.transcoder RETURN count(*) AS n",
            tcs=tcs,
        )
        == 0
    )
    assert (
        _count(
            neo4j_driver,
            db,
            "MATCH (p:Prompt)<-[:IN]-(:InputToken)-[:OF]->(t:Token) "
            "WHERE p.transcoder IN $tcs AND t.model <> p.model RETURN count(*) AS n",
            tcs=tcs,
        )
        == 0
    )
    # attribution edges stay inside a prompt, aggregate edges inside a dictionary
    assert (
        _count(
            neo4j_driver,
            db,
            "MATCH (x:Instance)-[:EDGE]->(y:Instance) WHERE x.prompt_id IN $pids "
            "AND x.prompt_id <> y.prompt_id RETURN count(*) AS n",
            pids=[p for side in world.prompts.values() for p in side.values()],
        )
        == 0
    )
    assert _count(neo4j_driver, db, "MATCH (f:Feature)-[:AGG_EDGE]->(g:Feature) WHERE f.transcoder IN $tcs "
                  "AND f.transcoder <> g.transcoder RETURN count(*) AS n", tcs=tcs) == 0  # fmt: skip
    assert (
        _count(
            neo4j_driver,
            db,
            "MATCH (f:Feature)-[:AGG_EDGE]->(t:Token) WHERE f.transcoder = $tc "
            "AND t.model <> $model RETURN count(*) AS n",
            tc=world.b.transcoder_id,
            model=world.model_b,
        )
        == 0
    )
    # the scoped queries return one dictionary's rows; the same text is three different prompts
    q = AtlasQueries(neo4j_driver, db)
    for name, side in (("a", world.a), ("b", world.b), ("r", world.ref)):
        listed = q.list_prompts(transcoder=side.transcoder_id).rows
        assert {p.prompt_id for p in listed} == set(world.prompts[name].values())
        assert {p.transcoder for p in listed} == {side.transcoder_id}
    both = q.top_features_for_logit("B", model=world.model_a).rows  # A and its reference share model A
    assert {r.feature_key.split("/")[0] for r in both} == {world.a.transcoder_id, world.ref.transcoder_id}
    only_a = q.top_features_for_logit("B", model=world.model_a, transcoder=world.a.transcoder_id).rows
    assert only_a and {r.feature_key.split("/")[0] for r in only_a} == {world.a.transcoder_id}
    on_a = q.features_on_token("A", model=world.model_a, transcoder=world.ref.transcoder_id).rows
    assert on_a and {r.feature_key.split("/")[0] for r in on_a} == {world.ref.transcoder_id}
    assert not q.top_features_for_logit("B", model=world.model_b, transcoder=world.a.transcoder_id).rows


def test_the_planted_difference_is_found_exactly(neo4j_driver: Driver, world: World, tmp_path: Path) -> None:
    result = diff_stored(neo4j_driver, world.database, world.a, world.b, reference=world.ref)
    assert [t for t, _, _ in result.shared] == sorted(TEXTS)  # "only B" is not shared
    assert result.alignment.one_to_one() == {(layer, f): (layer, ORDER[layer][f]) for layer in range(2)
                                             for f in range(3)}  # fmt: skip
    assert result.alignment.classification == "injective"
    assert result.alignment.r2 is not None and result.alignment.r2 > 0.99  # fitted on the graphs' features
    by_text = {text: d for (text, _, _), d in zip(result.shared, result.diffs, strict=True)}
    for text in WITH_A:
        d, pos = by_text[text], len(text)  # 'A' is the last token; BOS is position 0
        assert [c.key for c in d.nodes_only_a] == [f"f0/0@{pos}"] and not d.nodes_only_b and not d.nodes_changed
        assert {c.key for c in d.edges_only_a} == {f"tok@{pos}:A -> f0/0@{pos}", f"f0/0@{pos} -> f1/0@{pos}"}
        assert [c.key for c in d.edges_only_b] == [f"tok@{pos}:A -> f1/0@{pos}"] and not d.edges_changed
        assert d.max_divergence_layer == "0" and d.similarity < 0.6
    for text in WITHOUT_A:
        d = by_text[text]
        assert d.similarity == pytest.approx(1.0) and not (d.nodes_only_a or d.edges_only_b or d.edges_changed)
    pid_a = {text: world.prompts["a"][text] for text in TEXTS}
    assert sorted(result.summary.changed) == sorted(pid_a[t] for t in WITH_A)
    # the reference (same model, noised dictionary) barely moves the circuit prompts; it rearranges the near-empty
    # graphs of the prompts without 'A' (their target gets almost no attribution), which the rewiring leaves alone
    floor = result.floor
    assert floor is not None and result.reference_summary is not None
    assert all(0 < floor.for_prompt(pid_a[t]).dissimilarity < 0.05 for t in WITH_A)
    assert all(floor.for_prompt(pid_a[t]).dissimilarity > 0.2 for t in WITHOUT_A)
    assert sorted(result.exceeding) == sorted(pid_a[t] for t in WITH_A)
    # stored: Diff node, ALIGNS_WITH between the stored features of aligned pairs, DuckDB rows
    store = DiffStore(neo4j_driver, tmp_path / "diffs.duckdb", world.database)
    record = to_record(result)
    created = store.write(record)
    try:
        rels = neo4j_driver.execute_query(
            "MATCH (fa:Feature)-[r:ALIGNS_WITH {diff: $id}]->(fb:Feature) RETURN fa.layer AS l, fa.index AS a, "
            "fb.index AS b, r.decoder_cos AS cos, r.method AS method", id=record.id, database_=world.database,
        ).records  # fmt: skip
        assert created == len(rels) > 0
        assert all(r["b"] == ORDER[r["l"]][r["a"]] and r["cos"] > 0.99 and r["method"] == "mutual" for r in rels)
        on = _count(neo4j_driver, world.database, "MATCH (d:Diff {id: $id})-[:ON]->(p:Prompt) RETURN count(p) AS n",
                    id=record.id)  # fmt: skip
        assert on == len(TEXTS)
        rows = store.read_prompts(record.id)
        assert [r["cluster"] for r in rows[:3]] == ["changed"] * 3 and rows[0]["exceeds_noise"] is True
        with duckdb.connect(str(tmp_path / "diffs.duckdb")) as con:
            n_real = con.execute("SELECT count(*) FROM diff_changes WHERE diff_id = ? AND exceeds_noise",
                                 [record.id]).fetchone()  # fmt: skip
            assert n_real == (3 * 4,)  # per 'A' prompt: one node and three edges
    finally:
        store.delete(record.id)
    assert _count(neo4j_driver, world.database, "MATCH ()-[r:ALIGNS_WITH {diff: $id}]->() RETURN count(r) AS n",
                  id=record.id) == 0  # fmt: skip


def _nothing_written(driver: Driver, world: World, duck: Path) -> bool:
    n = _count(driver, world.database, "MATCH (d:Diff) WHERE d.a IN $tcs RETURN count(d) AS n",
               tcs=[world.a.transcoder_id, world.ref.transcoder_id])  # fmt: skip
    n += _count(driver, world.database, "MATCH (f:Feature)-[r:ALIGNS_WITH]->() WHERE f.transcoder = $tc "
                "RETURN count(r) AS n", tc=world.a.transcoder_id)  # fmt: skip
    if duck.exists():
        with duckdb.connect(str(duck)) as con:
            n += con.execute("SELECT count(*) FROM diffs").fetchone()[0]  # type: ignore[index]
    return n == 0


def test_bad_inputs_are_refused_and_nothing_is_written(neo4j_driver: Driver, world: World, tmp_path: Path) -> None:
    db, duck = world.database, tmp_path / "diffs.duckdb"
    unknown = dataclasses.replace(world.b, transcoder_id="clt-0000000000000000")
    with pytest.raises(DiffInputError, match="'clt-0000000000000000' is not in the store"):
        diff_stored(neo4j_driver, db, world.a, unknown)
    with pytest.raises(DiffInputError, match="prompt intersection is empty"):
        diff_stored(neo4j_driver, db, world.a, world.b, texts=["only B"])
    other = tiny_tokenizer()
    other.add_tokens(["zebra"])
    retokenized = dataclasses.replace(world.b, model=dataclasses.replace(world.b.model, tokenizer=other))
    with pytest.raises(DiffInputError, match="different tokenizers"):
        diff_stored(neo4j_driver, db, world.a, retokenized)
    narrow = PerLayerTranscoder(TranscoderSpec("plt", 2, 8, D_MLP, activation=ActivationConfig("relu")))
    with pytest.raises(AlignmentError, match="residual widths differ"):
        diff_stored(neo4j_driver, db, world.a, dataclasses.replace(world.b, transcoder=narrow))
    # a record naming a prompt that is not stored: refused by the store, both stores untouched
    result = diff_stored(neo4j_driver, db, world.a, world.b, texts=WITHOUT_A)
    record = to_record(result)
    record.prompts[0]["prompt_a"] = "no-such-prompt"
    with pytest.raises(DiffStoreError, match="no-such-prompt"):
        DiffStore(neo4j_driver, duck, db).write(record)
    assert _nothing_written(neo4j_driver, world, duck)


def _cli_env(c: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("NEO4J_URI", c.uri), ("NEO4J_USER", c.user), ("NEO4J_PASSWORD", c.password),  # type: ignore[attr-defined]
                        ("NEO4J_DATABASE", c.database), ("ATLAS_STATS_DB", str(tmp_path / "stats.duckdb"))):  # type: ignore[attr-defined]  # fmt: skip
        monkeypatch.setenv(name, value)


def _save_side(side: Side, directory: Path, *, rewired: bool) -> tuple[Path, Path]:
    """The side's model (rebuilt: a booted bridge cannot be saved) as a Hugging Face directory and its dictionary
    in circuit-tracer's format."""
    model_dir, dict_dir = directory / "model", directory / "transcoders"
    hf, tokenizer = planted_hf_model(rewired=rewired, order=ORDER if rewired else None)
    hf.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    save_transcoder(side.transcoder, dict_dir, model_name=str(model_dir))
    return model_dir, dict_dir


def test_cli_transfers_an_ablation_where_the_circuit_is_shared_and_not_where_it_was_rewired(
    neo4j_driver: Driver, neo4j_connection: object, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from atlas_cli.main import app

    _cli_env(neo4j_connection, tmp_path, monkeypatch)
    (model_a, dict_a), (model_b, dict_b) = (
        _save_side(world.a, tmp_path / "a", rewired=False),
        _save_side(world.b, tmp_path / "b", rewired=True),
    )
    prompts = tmp_path / "prompts.jsonl"  # two tasks: the prompt groups of the distributional classification
    tasks = [{"text": text, "task": "short" if len(text) < 5 else "long"} for text in WITH_A]
    prompts.write_text("".join(json.dumps(task) + "\n" for task in tasks))
    base = ["diff", world.a.transcoder_id, world.b.transcoder_id, "--prompts", str(prompts), "--model-a",
            str(model_a), "--model-b", str(model_b), "--transcoders-a", str(dict_a), "--transcoders-b", str(dict_b),
            "--transfer-target", "B", "--no-store"]  # fmt: skip
    hop2 = CliRunner().invoke(app, [*base, "--transfer", "1/0"])
    assert hop2.exit_code == 0, hop2.output
    text = " ".join(hop2.output.split())
    # hop 2 is A's feature 1/0 and B's 1/2 (the permutation); ablating it removes the target on both sides
    assert "ablate 1/0 in A, 1/2 in B" in text and "transfer agreement: 100% of 3 prompt(s)" in text
    assert "activation agreement by prompt group (median correlation of the aligned pairs): long " in text
    assert ", short " in text
    hop1 = CliRunner().invoke(app, [*base, "--transfer", "0/0"])
    assert hop1.exit_code == 0, hop1.output
    assert "transfer agreement: 0% of 3 prompt(s)" in " ".join(hop1.output.split())
    # a feature without an aligned partner: one red line, and --no-store aside, nothing was written either way
    stray = CliRunner().invoke(app, [*base[:-1], "--store", "--transfer", "0/4"])
    assert stray.exit_code == 2 and "no feature of the circuit" in " ".join(stray.output.split())
    assert _nothing_written(neo4j_driver, world, tmp_path / "diffs.duckdb")


def test_cli_refuses_bad_input_with_one_line_and_writes_nothing(
    neo4j_driver: Driver, neo4j_connection: object, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from atlas_cli.main import app

    _cli_env(neo4j_connection, tmp_path, monkeypatch)
    runner = CliRunner()
    lone = runner.invoke(app, ["diff", world.a.transcoder_id, world.b.transcoder_id, "--transfer", "1/0"])
    assert lone.exit_code == 2 and "--transfer-target" in " ".join(lone.output.split())
    unknown = runner.invoke(app, ["diff", world.a.transcoder_id, "plt-0123456789abcdef"])
    assert unknown.exit_code == 2 and "'plt-0123456789abcdef' is not in the store" in " ".join(unknown.output.split())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("only B\n")
    empty = runner.invoke(app, ["diff", world.a.transcoder_id, world.b.transcoder_id, "--prompts", str(prompts)])
    assert empty.exit_code == 2 and "prompt intersection is empty" in " ".join(empty.output.split())
    bad = runner.invoke(app, ["diff", world.a.transcoder_id, world.b.transcoder_id, "--quantile", "0.2"])
    assert bad.exit_code == 2 and "quantile" in bad.output
    assert _nothing_written(neo4j_driver, world, tmp_path / "diffs.duckdb")
    assert not (tmp_path / "diffs.duckdb").exists()


def test_app_compare_page_shows_the_stored_diff(
    neo4j_driver: Driver, neo4j_connection: object, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamlit.testing.v1 import AppTest

    c = neo4j_connection
    monkeypatch.delenv("NEO4J_URI", raising=False)
    for name, value in (("ATLAS_NEO4J_URI", c.uri), ("NEO4J_USER", c.user), ("NEO4J_PASSWORD", c.password),  # type: ignore[attr-defined]
                        ("NEO4J_DATABASE", c.database), ("ATLAS_STATS_DB", str(tmp_path / "stats.duckdb"))):  # type: ignore[attr-defined]  # fmt: skip
        monkeypatch.setenv(name, value)
    result = diff_stored(neo4j_driver, world.database, world.a, world.b, reference=world.ref)
    record = to_record(result)
    store = DiffStore(neo4j_driver, tmp_path / "diffs.duckdb", world.database)
    store.write(record)
    try:
        at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app" / "main.py"), default_timeout=120)
        at.run()
        at.switch_page("views/compare.py").run()
        at.selectbox(key="diff_pick").select(record.id).run()
        assert not at.exception and not at.error, (at.exception, at.error)
        assert [m.value for m in at.metric][:2] == ["injective", "100.0%"]
        prompts = next(d.value for d in at.dataframe if "cluster" in d.value.columns)
        assert len(prompts) == len(TEXTS) and set(prompts["cluster"]) == {"changed", "unchanged"}
        assert sorted(prompts.loc[prompts["cluster"] == "changed", "prompt"]) == sorted(WITH_A)
        at.selectbox(key="diff_prompt_pick").select(world.prompts["a"]["xyzA"]).run()
        changes = next(d.value for d in at.dataframe if "status" in d.value.columns)
        assert sorted(changes["key"]) == sorted(["f0/0@4", "tok@4:A -> f0/0@4", "f0/0@4 -> f1/0@4",
                                                 "tok@4:A -> f1/0@4"])  # fmt: skip
        assert changes["exceeds_noise"].all()
        # hop 2 is in both graphs (aligned: highlighted on both sides); hop 1's partner is not in B's graph
        assert any(cap.value.startswith("highlighted: 1 feature node(s) of A") for cap in at.caption)
    finally:
        store.delete(record.id)
