"""Validation results in a real Neo4j and DuckDB: round trip, the "passed on ≥ 80%" query, and all-or-nothing writes.

The planted two-hop model's prompts are attributed and written by the real `GraphWriter` under fresh names, then
validated; every test deletes what it wrote.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import pytest
from neo4j import Driver
from planted_model import CIRCUIT, planted_model, planted_transcoder

from atlas.attribution.engine import attribute
from atlas.attribution.export import prune_graph
from atlas.attribution.targets import token_targets
from atlas.models.loading import LoadedModel
from atlas.storage.neo4j_writer import GraphWriter
from atlas.storage.validations import ValidationStore, ValidationStoreError, record_from_report
from atlas.transcoders.per_layer import PerLayerTranscoder
from atlas.validation.validate import Circuit, TargetSpec, ValidationError, validate
from ingest.validation import ResolvedRequest, ValidationRequest, run_validation

pytestmark = pytest.mark.usefixtures("neo4j_driver")

TEXTS = {"p0": "xyzA", "p1": "qA", "p2": "hello A"}
ONLY_A = {"p3": "A"}  # stored too: the distractors that fire off 'A' are inactive here


@dataclass
class StoredPlanted:
    model: LoadedModel
    transcoder: PerLayerTranscoder
    transcoder_id: str
    model_key: str
    database: str
    prompt_ids: dict[str, str]


@pytest.fixture(scope="module")
def stored(neo4j_driver: Driver, neo4j_connection: object) -> Iterator[StoredPlanted]:
    database = neo4j_connection.database  # type: ignore[attr-defined]
    tag = uuid.uuid4().hex[:10]
    model = planted_model()
    transcoder = planted_transcoder(model)
    world = StoredPlanted(model, transcoder, f"planted-tc-{tag}", f"planted-model-{tag}", database, {})
    writer = GraphWriter(neo4j_driver, database)
    for name, text in {**TEXTS, **ONLY_A}.items():
        pid = f"test-validation-{tag}-{name}"
        world.prompt_ids[name] = pid
        n_pos = len(text) + 1  # one character per token, BOS first
        targets = token_targets(["B"], model.model.W_U.detach().float(), model.tokenizer, n_pos - 1)
        graph = attribute(model, transcoder, text, targets=targets, transcoder_id=world.transcoder_id)
        # stored as ingest stores them, with each node's cumulative influence, but unpruned: every feature is kept
        nodes, edges = graph.to_tables(pid, influence=prune_graph(graph).result.cumulative_scores)
        writer.write_prompt({"id": pid, "text": text, "model": world.model_key, "transcoder": world.transcoder_id},
                            nodes, edges)  # fmt: skip
    try:
        yield world
    finally:
        for pid in world.prompt_ids.values():
            writer.delete_prompt(pid)
        for query in (
            "MATCH (f:Feature {transcoder: $tc}) DETACH DELETE f",
            "MATCH (t:Token {model: $model}) DETACH DELETE t",
            "MATCH (v:Validation {transcoder: $tc}) DETACH DELETE v",
        ):
            neo4j_driver.execute_query(query, tc=world.transcoder_id, model=world.model_key, database_=database)


def _report(world: StoredPlanted, circuit: list[tuple[int, int]] | None = None):  # type: ignore[no-untyped-def]
    names = list(TEXTS)
    return validate(
        world.model,
        world.transcoder,
        Circuit.of(circuit or list(CIRCUIT), world.transcoder),
        [TEXTS[n] for n in names],
        TargetSpec.token("B"),
        prompt_ids=[world.prompt_ids[n] for n in names],
    )


def _counts(driver: Driver, world: StoredPlanted, duck: Path) -> tuple[int, int]:
    n_nodes = driver.execute_query(
        "MATCH (v:Validation {transcoder: $tc}) RETURN count(v) AS n", tc=world.transcoder_id, database_=world.database
    ).records[0]["n"]
    if not duck.exists():
        return n_nodes, 0
    with duckdb.connect(str(duck)) as con:
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        n_rows = con.execute("SELECT count(*) FROM validations").fetchone()[0] if "validations" in tables else 0
    return n_nodes, n_rows


def test_round_trip_and_the_passed_query(neo4j_driver: Driver, stored: StoredPlanted, tmp_path: Path) -> None:
    duck = tmp_path / "validations.duckdb"
    store = ValidationStore(neo4j_driver, duck, stored.database)
    report = _report(stored)
    record = record_from_report(report, transcoder_id=stored.transcoder_id, model=stored.model_key, label="planted")
    vid = store.write(record)
    back = store.read(vid)
    assert back is not None
    assert back.feature_keys == sorted(f"{stored.transcoder_id}/{layer}/{f}" for layer, f in CIRCUIT)
    assert back.properties["pass_fraction"] == 1.0 and back.properties["n_prompts"] == 3
    assert back.properties["mode"] == report.mode
    assert back.properties["necessity_zero"] == pytest.approx(report.summary("necessity_zero").mean)
    assert "necessity_mean" not in back.properties  # NaN (no means given) is stored as absent
    for row, p in zip(back.prompts, sorted(report.prompts, key=lambda p: p.prompt_id or ""), strict=True):
        assert row["prompt_id"] == p.prompt_id and row["beats_null"] is True
        assert row["necessity_zero"] == pytest.approx(p.necessity_zero)
        assert row["null_necessity"] == pytest.approx(p.null_necessity)
        assert row["agreement"] == pytest.approx(p.agreement)
    agreement = neo4j_driver.execute_query(
        "MATCH (p:Prompt) WHERE p.id IN $ids RETURN p.id AS id, p.agreement AS a",
        ids=[stored.prompt_ids[name] for name in TEXTS],
        database_=stored.database,
    ).records
    assert all(r["a"] is not None and r["a"] > 0.9 for r in agreement)
    # The question the storage is for: which stored circuits passed validation on at least 80% of their prompts?
    passed = neo4j_driver.execute_query(
        "MATCH (v:Validation {transcoder: $tc})-[o:ON]->(:Prompt) WITH v, avg(CASE WHEN o.beats_null THEN 1.0 "
        "ELSE 0.0 END) AS share WHERE share >= 0.8 RETURN v.id AS id",
        tc=stored.transcoder_id,
        database_=stored.database,
    ).records
    assert [r["id"] for r in passed] == [vid]
    with duckdb.connect(str(duck)) as con:
        assert con.execute("SELECT id, n_prompts, pass_fraction FROM validations").fetchall() == [(vid, 3, 1.0)]
        rows = con.execute("SELECT count(*), bool_and(beats_null) FROM validation_prompts WHERE validation_id = ?",
                           [vid]).fetchone()  # fmt: skip
        assert rows == (3, True)
    # a random same-size set is stored as failing, and the query leaves it out
    failing = record_from_report(_report(stored, [(0, 1), (1, 2)]), transcoder_id=stored.transcoder_id,
                                 model=stored.model_key)  # fmt: skip
    store.write(failing)
    assert _counts(neo4j_driver, stored, duck) == (2, 2)
    passed_again = neo4j_driver.execute_query(
        "MATCH (v:Validation {transcoder: $tc})-[o:ON]->(:Prompt) WITH v, avg(CASE WHEN o.beats_null THEN 1.0 "
        "ELSE 0.0 END) AS share WHERE share >= 0.8 RETURN v.id AS id",
        tc=stored.transcoder_id,
        database_=stored.database,
    ).records
    assert [r["id"] for r in passed_again] == [vid]
    store.delete(vid)
    store.delete(failing.id)
    assert _counts(neo4j_driver, stored, duck) == (0, 0)


def test_unknown_features_and_prompts_write_nothing(
    neo4j_driver: Driver, stored: StoredPlanted, tmp_path: Path
) -> None:
    duck = tmp_path / "validations.duckdb"
    store = ValidationStore(neo4j_driver, duck, stored.database)
    record = record_from_report(_report(stored), transcoder_id=stored.transcoder_id, model=stored.model_key)
    unknown_feature = replace(record, feature_keys=[*record.feature_keys, f"{stored.transcoder_id}/1/5"])
    with pytest.raises(ValidationStoreError, match=r"unknown feature key\(s\) \['planted-tc-.*/1/5'\]"):
        store.write(unknown_feature)
    unknown_prompt = replace(record, prompts=[*record.prompts, {**record.prompts[0], "prompt_id": "no-such-prompt"}])
    with pytest.raises(ValidationStoreError, match=r"unknown prompt id\(s\) \['no-such-prompt'\]"):
        store.write(unknown_prompt)
    assert _counts(neo4j_driver, stored, duck) == (0, 0)
    report = _report(stored)
    report.prompts[0].prompt_id = None
    with pytest.raises(ValidationStoreError, match="no stored prompt id"):
        record_from_report(report, transcoder_id=stored.transcoder_id, model=stored.model_key)


@pytest.mark.parametrize("fail_at", ["validation", "features", "prompts", "duckdb-commit"])
def test_a_failure_part_way_leaves_nothing_partial(
    neo4j_driver: Driver, stored: StoredPlanted, tmp_path: Path, fail_at: str
) -> None:
    duck = tmp_path / "validations.duckdb"
    store = ValidationStore(neo4j_driver, duck, stored.database)
    record = record_from_report(_report(stored), transcoder_id=stored.transcoder_id, model=stored.model_key)

    def hook(step: str) -> None:
        if step == fail_at:
            raise KeyboardInterrupt(f"interrupted after {step}")

    with pytest.raises(KeyboardInterrupt):
        store.write(record, hook=hook)
    assert _counts(neo4j_driver, stored, duck) == (0, 0)
    on = neo4j_driver.execute_query(
        "MATCH (:Validation)-[o:ON]->(p:Prompt) WHERE p.id IN $ids RETURN count(o) AS n",
        ids=list(stored.prompt_ids.values()),
        database_=stored.database,
    ).records[0]["n"]
    assert on == 0
    assert not math.isnan(record.properties["necessity_zero"])
    store.write(record)  # the same record goes in cleanly afterwards
    assert _counts(neo4j_driver, stored, duck) == (1, 1)
    store.delete(record.id)


# --- the orchestration behind `atlas validate` ------------------------------------------------------------------
def _request(**kwargs: object) -> ValidationRequest:
    return ValidationRequest(target=TargetSpec.token("B"), **kwargs)  # type: ignore[arg-type]


def test_run_validation_reads_the_circuit_from_the_store_and_stores_the_result(
    neo4j_driver: Driver, stored: StoredPlanted, tmp_path: Path
) -> None:
    duck = tmp_path / "validations.duckdb"
    loads: list[ResolvedRequest] = []

    def load(resolved: ResolvedRequest) -> tuple[LoadedModel, PerLayerTranscoder]:
        loads.append(resolved)
        return stored.model, stored.transcoder

    ids = [stored.prompt_ids[name] for name in TEXTS]
    run = dict(stats_path=tmp_path / "no-stats.duckdb", validations_path=duck)
    # the circuit as the top-2 features by stored influence of one prompt's graph: the planted hops
    report, record = run_validation(neo4j_driver, stored.database,
                                    _request(top_k_from=ids[0], top_k=2, prompt_ids=ids), load, **run)  # type: ignore[arg-type]  # fmt: skip
    assert report.circuit.features == tuple(sorted(CIRCUIT))
    assert report.pass_fraction == 1.0 and record is not None
    assert math.isnan(report.prompts[0].necessity_mean)  # no statistics: no mean-ablation
    assert _counts(neo4j_driver, stored, duck) == (1, 1)
    ValidationStore(neo4j_driver, duck, stored.database).delete(record.id)
    # bad input: named, nothing loaded, nothing written
    bad = [
        (_request(features=["0/0"], prompt_ids=["no-such"]), r"unknown prompt id\(s\) \['no-such'\]"),
        (_request(features=["0/0"], task=f"no-task-{uuid.uuid4().hex}"), "prompt set is empty"),
        (_request(features=["0/0"]), "prompt set is empty"),
        (_request(features=["1/5"], prompt_ids=ids), r"unknown feature key\(s\) .*1/5'\]: not in the store"),
        (_request(features=["other/0/0"], prompt_ids=ids), r"unknown feature key\(s\) \['other/0/0'\]"),
        (_request(prompt_ids=ids), "circuit is empty"),
    ]
    for request, message in bad:
        with pytest.raises(ValidationError, match=message):
            run_validation(neo4j_driver, stored.database, request, load, **run)  # type: ignore[arg-type]
    assert len(loads) == 1
    # a circuit inactive on every prompt: loaded and run, but nothing stored
    with pytest.raises(ValidationError, match="is active on any prompt"):
        run_validation(neo4j_driver, stored.database, _request(features=["1/1"], prompt_ids=[stored.prompt_ids["p3"]]),
                       load, **run)  # type: ignore[arg-type]  # fmt: skip
    assert _counts(neo4j_driver, stored, duck) == (0, 0)


def test_atlas_validate_reports_bad_input_in_one_line(
    stored: StoredPlanted, neo4j_connection: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from atlas_cli.main import app

    for name, value in (("NEO4J_URI", "uri"), ("NEO4J_USER", "user"), ("NEO4J_PASSWORD", "password"),
                        ("NEO4J_DATABASE", "database")):  # fmt: skip
        monkeypatch.setenv(name, getattr(neo4j_connection, value))
    monkeypatch.setenv("ATLAS_STATS_DB", str(tmp_path / "feature_stats.duckdb"))
    base = ["validate", "--transcoders", str(tmp_path), "--target", "B"]
    pid = stored.prompt_ids["p0"]
    cases = [
        ([*base, "--feature", "0/0"], "the prompt set is empty"),
        ([*base, "--feature", "0/0", "--prompt-id", "no-such"], "unknown prompt id(s) ['no-such']"),
        ([*base, "--feature", "3/0", "--prompt-id", pid], "not in the store"),
        ([*base, "--prompt-id", pid], "the circuit is empty"),
        ([*base[:2], str(tmp_path / "none"), *base[3:], "--feature", "0/0", "--prompt-id", pid], "does not exist"),
        ([*base, "--feature", "0/0", "--prompt-id", pid, "--n-null", "0"], "--n-null"),
        ([*base, "--from-paths"], "--from-paths needs --feature (its sources), --at-token, or both"),
        ([*base, "--from-paths", "--at-token", "A", "--hops", "9"], "--hops"),
        ([*base, "--feature", "0/0", "--prompt-file", str(tmp_path / "none.txt")], "none.txt does not exist"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "validations.duckdb").exists()


def test_the_query_library_finds_the_planted_path(neo4j_driver: Driver, stored: StoredPlanted) -> None:
    from atlas.storage.queries import AtlasQueries

    queries = AtlasQueries(neo4j_driver, stored.database)
    ids = [stored.prompt_ids[name] for name in TEXTS]
    rows = queries.paths_to_logits(None, ["B"], at_token="A", max_hops=3, prompt_ids=ids, limit=100).rows
    hop1, hop2 = (f"{stored.transcoder_id}/{layer}/{f}" for layer, f in CIRCUIT)
    for pid in ids:
        mine = [r for r in rows if r.prompt_id == pid]
        assert mine, pid
        best = mine[0]  # strongest first
        assert [n.key for n in best.nodes[:-1]] == [hop1, hop2] and best.nodes[-1].text == "B"


def test_the_planted_path_is_robust_to_the_weight_cut_off(neo4j_driver: Driver, stored: StoredPlanted) -> None:
    from atlas.storage.queries import AtlasQueries, QueryError
    from atlas.storage.robustness import path_robustness

    queries = AtlasQueries(neo4j_driver, stored.database)
    ids = [stored.prompt_ids[name] for name in TEXTS]
    rows = path_robustness(queries, None, ["B"], at_token="A", prompt_ids=ids, min_weights=[0.5, 0.0, 0.1], top_k=3)
    assert [r.min_abs_weight for r in rows] == [0.0, 0.1, 0.5]
    assert rows[0].top_path_overlap == 1.0 and rows[0].feature_jaccard == 1.0
    strong = path_robustness(queries, None, ["B"], at_token="A", prompt_ids=ids, min_weights=[0.0, 1.0], top_k=1)
    assert strong[1].n_paths >= 3  # the planted paths' edges are all far above 1.0
    assert strong[1].top_path_overlap == 1.0 and strong[1].feature_jaccard == 1.0
    assert all(r.n_paths <= rows[0].n_paths for r in rows)
    with pytest.raises(QueryError, match="at least two cut-offs"):
        path_robustness(queries, None, ["B"], at_token="A", min_weights=[0.1])


def test_atlas_paths_prints_the_stability_over_cut_offs(
    stored: StoredPlanted, neo4j_connection: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from atlas_cli.main import app

    for name, value in (("NEO4J_URI", "uri"), ("NEO4J_USER", "user"), ("NEO4J_PASSWORD", "password"),
                        ("NEO4J_DATABASE", "database")):  # fmt: skip
        monkeypatch.setenv(name, getattr(neo4j_connection, value))
    args = ["paths", "--at-token", "A", "--target", "B", "--model", stored.model_key, "--cut-off", "1.0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "stability against the loosest cut-off" in result.output
    lines = [line for line in result.output.splitlines() if line.strip().startswith("│ 1 ")]
    assert len(lines) == 2  # the strongest path and the 1.0 cut-off's stability row
    assert "L0/0@" in lines[0] and "L1/0@" in lines[0] and "'B'" in lines[0]  # the planted path ranks first
    cells = [c.strip() for c in lines[1].strip("│ ").split("│")]
    n_paths, kept, jaccard_value = int(cells[1]), float(cells[3].rstrip("%")), float(cells[4])
    assert n_paths > 0 and 0 < kept <= 100 and 0 < jaccard_value <= 1  # weaker paths drop out, the planted stay


def test_circuits_from_a_paths_query_and_prompts_from_a_file(
    neo4j_driver: Driver, stored: StoredPlanted, tmp_path: Path
) -> None:
    from ingest.validation import PathsQuery

    duck = tmp_path / "validations.duckdb"

    def load(resolved: ResolvedRequest) -> tuple[LoadedModel, PerLayerTranscoder]:
        return stored.model, stored.transcoder

    run = dict(stats_path=tmp_path / "no-stats.duckdb", validations_path=duck)
    ids = [stored.prompt_ids[name] for name in TEXTS]
    # the circuit as the first two features along the strongest `atlas paths --at-token A --target B` paths
    paths = PathsQuery(("B",), at_token="A", model=stored.model_key)
    report, _ = run_validation(neo4j_driver, stored.database, _request(from_paths=paths, top_k=2, prompt_ids=ids,
                                                                       store=False), load, **run)  # type: ignore[arg-type]  # fmt: skip
    assert report.circuit.features == tuple(sorted(CIRCUIT)) and report.pass_fraction == 1.0
    assert [p.prompt_id for p in report.prompts] == ids
    with pytest.raises(ValidationError, match="one circuit"):
        run_validation(neo4j_driver, stored.database, _request(from_paths=paths, features=["0/0"], prompt_ids=ids),
                       load, **run)  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(ValidationError, match="paths query"):
        run_validation(neo4j_driver, stored.database,
                       _request(from_paths=PathsQuery(("B",), at_token="no-such-token", model=stored.model_key)),
                       load, **run)  # type: ignore[arg-type]  # fmt: skip
    # prompts from a file: the stored ones are recognised by their text, so the result can be stored
    stored_file = tmp_path / "stored.jsonl"
    stored_file.write_text("".join(json.dumps({"text": TEXTS[n]}) + "\n" for n in ("p1", "p0")), encoding="utf-8")
    report, record = run_validation(neo4j_driver, stored.database,
                                    _request(features=["0/0", "1/0"], prompt_file=stored_file), load, **run)  # type: ignore[arg-type]  # fmt: skip
    assert record is not None and [p.prompt_id for p in report.prompts] == [stored.prompt_ids[n] for n in ("p1", "p0")]
    assert report.pass_fraction == 1.0
    ValidationStore(neo4j_driver, duck, stored.database).delete(record.id)
    # a prompt that is not stored: validated with --no-store, refused (nothing loaded) when it would be stored
    other = tmp_path / "other.txt"
    other.write_text("zzA\nqA\n", encoding="utf-8")
    with pytest.raises(ValidationError, match=r"1 prompt\(s\) of .*other.txt are not stored .*'zzA'.*--no-store"):
        run_validation(neo4j_driver, stored.database, _request(features=["0/0", "1/0"], prompt_file=other), load,
                       **run)  # type: ignore[arg-type]  # fmt: skip
    report, record = run_validation(neo4j_driver, stored.database,
                                    _request(features=["0/0", "1/0"], prompt_file=other, store=False), load, **run)  # type: ignore[arg-type]  # fmt: skip
    assert record is None and [p.prompt_id for p in report.prompts] == [None, stored.prompt_ids["p1"]]
    assert report.prompts[0].necessity_zero > 0.9
    with pytest.raises(ValidationError, match="does not exist"):
        run_validation(neo4j_driver, stored.database, _request(features=["0/0"], prompt_file=tmp_path / "no.txt"),
                       load, **run)  # type: ignore[arg-type]  # fmt: skip
    assert _counts(neo4j_driver, stored, duck) == (0, 0)
