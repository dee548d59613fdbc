"""One dictionary, one identity: transcoder ids hash weights and semantic config, never timings, paths or names.

Unit tests of `atlas.transcoders.identity`, then, against a real Neo4j (session fixtures) and DuckDB on the tiny
model: an ingest through a renamed, re-saved copy stores nothing new; and `atlas db migrate` (`ingest.migrate`)
turns a store of the old era holding one dictionary under two path-keyed ids into exactly the store one ingest
builds (counts, prompt ids, aggregate sums, feature statistics), idempotently.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import duckdb
import pytest
import torch
from neo4j import Driver
from typer.testing import CliRunner

import ingest.pipeline
from atlas.models.identity import model_identity
from atlas.models.tiny import TINY_MODELS, build_tiny_hf_model, tiny_tokenizer
from atlas.storage import identities
from atlas.storage.aggregate import aggregate_rows, rebuild_aggregates
from atlas.storage.feature_stats import FeatureStatsShard, FeatureStatsStore
from atlas.storage.graph_schema import STORE_NAME
from atlas.storage.identities import transcoders
from atlas.storage.migrations import ensure_schema
from atlas.storage.neo4j_server import Neo4jConnection
from atlas.transcoders import (
    ActivationConfig,
    TranscoderSpec,
    build_transcoder,
    legacy_transcoder_identity,
    load_transcoder,
    save_transcoder,
    transcoder_identity,
)
from atlas_cli.main import app
from ingest.migrate import legacy_ids, migrate_identities
from ingest.pipeline import IngestOptions, run_ingest

MODEL = "tiny-llama"
PROMPTS = [
    ("When Mary and John went to the store, John gave a drink to", "ioi"),
    ("The capital of France is", "capitals"),
    ("The opposite of hot is", "antonyms"),
    ("2+3=5, 4+1=5, 3+4=", "addition"),
]


def _transcoder(kind: str = "clt", *, seed: int = 5, **spec: Any) -> Any:
    torch.manual_seed(seed)
    transcoder = build_transcoder(TranscoderSpec(kind=kind, n_layers=2, d_model=32, n_features=8, **spec))  # type: ignore[arg-type]
    with torch.no_grad():
        transcoder.b_enc.fill_(0.05)
        for layer in range(2):
            transcoder.W_dec[layer].mul_(20)
        transcoder.b_dec[0, 0] += 1e-6 * (1 + uuid.uuid4().int % 1000)  # this test's dictionary alone
    return transcoder


def _save(transcoder: Any, directory: Path, seconds: float) -> Path:
    """Save as a training run does: run-specific values (timings, tags) in atlas.json."""
    return save_transcoder(transcoder, directory, model_name=MODEL,
                           metadata={"train_seconds_this_session": seconds, "run": uuid.uuid4().hex})  # fmt: skip


# -- pure parts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_identity_ignores_timings_names_and_paths(tmp_path: Path, kind: str) -> None:
    transcoder = _transcoder(kind, skip=True)
    a = _save(transcoder, tmp_path / "transcoders", 12.5)
    b = _save(transcoder, tmp_path / "elsewhere" / "my-dictionary", 99.0)
    assert (a / "atlas.json").read_bytes() != (b / "atlas.json").read_bytes()
    assert (a / "config.yaml").read_bytes() != (b / "config.yaml").read_bytes()  # it holds the paths
    ia, ib = transcoder_identity(a), transcoder_identity(b)
    assert ia.id == ib.id and ia.id.startswith(f"{kind}-") and len(ia.id) == len(kind) + 17
    assert (ia.name, ib.name) == ("transcoders", "my-dictionary") and ia.source != ib.source
    assert legacy_transcoder_identity(a) != legacy_transcoder_identity(b)  # what split the store before
    copy = shutil.copytree(a, tmp_path / "copied")
    assert transcoder_identity(copy).id == ia.id
    resaved = _save(load_transcoder(b), tmp_path / "resaved", 1.0)  # load + save: same tensors, same id
    assert transcoder_identity(resaved).id == ia.id
    assert ia.n_bytes == sum(p.numel() * 4 for p in transcoder.parameters())  # every tensor, once


def test_identity_follows_one_weight_and_the_semantic_config(tmp_path: Path) -> None:
    transcoder = _transcoder("clt")
    base = transcoder_identity(_save(transcoder, tmp_path / "base", 1.0)).id
    with torch.no_grad():
        transcoder.W_enc[1, 3, 7] += 1e-3
    assert transcoder_identity(_save(transcoder, tmp_path / "one-weight", 1.0)).id != base
    with torch.no_grad():
        transcoder.W_enc[1, 3, 7] -= 1e-3
    assert transcoder_identity(_save(transcoder, tmp_path / "back", 1.0)).id == base
    other_hooks = build_transcoder(dataclasses.replace(transcoder.spec, input_hook="hook_resid_mid"))
    other_hooks.load_state_dict(transcoder.state_dict())
    assert transcoder_identity(_save(other_hooks, tmp_path / "hooks", 1.0)).id != base
    relu = build_transcoder(dataclasses.replace(transcoder.spec, activation=ActivationConfig("topk", 4)))
    relu.load_state_dict({k: v for k, v in transcoder.state_dict().items() if "threshold" not in k})
    topk = transcoder_identity(_save(relu, tmp_path / "topk", 1.0)).id
    relu8 = build_transcoder(dataclasses.replace(transcoder.spec, activation=ActivationConfig("topk", 8)))
    relu8.load_state_dict(relu.state_dict())
    assert len({base, topk, transcoder_identity(_save(relu8, tmp_path / "topk8", 1.0)).id}) == 3


def _local_model(directory: Path, *, bump: float = 0.0) -> Path:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    hf = build_tiny_hf_model(TINY_MODELS["tiny-llama"], vocab_size=len(tokenizer))
    if bump:
        with torch.no_grad():
            next(hf.parameters()).view(-1)[0] += bump
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_model_identity_is_the_weights_of_a_local_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))
    a = model_identity(str(_local_model(tmp_path / "here" / "model")))
    moved = shutil.copytree(tmp_path / "here" / "model", tmp_path / "there" / "renamed")
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(
        json.dumps({**config, "_name_or_path": "/elsewhere", "transformers_version": "0"})
    )
    b = model_identity(str(moved))
    assert a.key == b.key and a.key.startswith("hf-") and a.source == "local-dir" and a.name != b.name
    assert not a.cached and model_identity(str(moved)).cached  # hashed once per file version
    assert model_identity(str(_local_model(tmp_path / "bumped", bump=1e-3))).key != a.key
    for stable in ("tiny-llama", "gpt2"):  # names that already identify their weights stay the keys
        assert model_identity(stable).key == stable


def test_packaged_model_identity_is_its_name_with_the_gguf_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from atlas.config import DEFAULT_MODEL
    from atlas.models.loading import ModelLoadError

    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))
    try:
        first = model_identity(DEFAULT_MODEL)
    except ModelLoadError:
        pytest.skip("the packaged default model is not installed")
    again = model_identity(DEFAULT_MODEL)
    assert first.key == again.key == DEFAULT_MODEL and first.weights == again.weights
    assert first.weights is not None and len(first.weights) == 64 and again.cached


def _stats(store: FeatureStatsStore, tmp: Path, transcoder_id: str, prompts: dict[str, float]) -> None:
    """One shard of 1 layer x 2 features: each prompt one token activating feature 0 at `prompts[pid]`."""
    shard = FeatureStatsShard(transcoder_id, 1, 2)
    for pid, value in prompts.items():
        shard.add(pid, ["t"], torch.tensor([[[value, 0.0]]]))
    store.ingest([shard.write(tmp)])


def test_statistics_merge_counts_each_prompt_once(tmp_path: Path) -> None:
    store = FeatureStatsStore(tmp_path / "s.duckdb")
    values = {"p1": 1.0, "p2": 2.0, "p3": 3.0, "p4": 4.0}
    _stats(store, tmp_path, "old-a", {"x1": 1.0, "x2": 2.0})  # p1, p2 under their old ids
    _stats(store, tmp_path, "old-b", {"y1": 1.0, "y2": 2.0})  # the same two prompts through a copy
    _stats(store, tmp_path, "old-c", {"z3": 3.0})  # a third copy with another prompt
    _stats(store, tmp_path, "old-d", {"w2": 2.0, "w4": 4.0})  # overlaps the others in part
    prompt_map = {"x1": "p1", "x2": "p2", "y1": "p1", "y2": "p2", "z3": "p3", "w2": "p2", "w4": "p4"}
    groups = {"clt-new": {"old-a": {"p1", "p2"}, "old-b": {"p1", "p2"}, "old-c": {"p3"}, "old-d": {"p2", "p4"},
                          "clt-new": set()}}  # fmt: skip
    actions = store.merge_transcoder_ids(groups, prompt_map)
    assert actions == {"old-a": "kept", "old-b": "dropped", "old-c": "added", "old-d": "inexact"}
    with duckdb.connect(str(store.path), read_only=True) as con:
        row = con.execute("SELECT n_tokens, n_active, max_activation FROM feature_stats "
                          "WHERE transcoder_id = 'clt-new' AND feature = 0").fetchone()  # fmt: skip
        examples = con.execute("SELECT prompt_id FROM top_examples WHERE transcoder_id = 'clt-new' AND feature = 0 "
                               "ORDER BY activation DESC").fetchall()  # fmt: skip
        left = con.execute("SELECT count(*) FROM feature_stats WHERE transcoder_id LIKE 'old-%'").fetchone()
    assert row == (3, 3, 3.0)  # p1, p2, p3 once each; p4 is lost with the partial overlap (reported inexact)
    assert [e[0] for e in examples] == ["p3", "p2", "p1"] and left == (0,)
    assert set(values) > {e[0] for e in examples}
    assert store.merge_transcoder_ids(groups, prompt_map) == {}  # idempotent


# -- real Neo4j ------------------------------------------------------------------------------------------------


def _corpus(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t, "task": task}) + "\n" for t, task in PROMPTS))
    return path


def _ingest(tmp: Path, transcoders_dir: Path, connection: Neo4jConnection, run: str, stats: Path,
            model: str = MODEL) -> Any:  # fmt: skip
    tmp.mkdir(parents=True, exist_ok=True)
    options = IngestOptions(corpus=_corpus(tmp / "corpus.jsonl"), transcoders=transcoders_dir, model=model, workers=0,
                            run=run, runs_root=tmp / "runs", stats_db=stats, progress=False)  # fmt: skip
    return run_ingest(options, connection=connection)


def _state(driver: Driver, transcoder_id: str, stats: Path) -> dict[str, Any]:
    """What a store holds for one transcoder: prompts, instances, edges, features, aggregates, statistics."""
    record = driver.execute_query(
        """
        CALL () { MATCH (p:Prompt {transcoder: $t}) RETURN collect(p.id) AS prompts }
        CALL () { MATCH (p:Prompt {transcoder: $t}) MATCH (n:Instance) WHERE n.prompt_id = p.id
                  AND n.node_index IS NOT NULL RETURN count(n) AS instances }
        CALL () { MATCH (p:Prompt {transcoder: $t}) MATCH (n:Instance)-[e:EDGE]->() WHERE n.prompt_id = p.id
                  AND n.node_index IS NOT NULL RETURN count(e) AS edges }
        CALL () { MATCH (f:Feature) WHERE f.transcoder = $t AND f.layer IS NOT NULL AND f.index IS NOT NULL
                  RETURN count(f) AS features }
        CALL () { MATCH (f:Feature)<-[:OF]-(a) WHERE f.transcoder = $t AND f.layer IS NOT NULL
                  AND f.index IS NOT NULL RETURN count(a) AS links }
        RETURN prompts, instances, edges, features, links
        """,
        t=transcoder_id,
    ).records[0]
    rows = aggregate_rows(driver, transcoder=transcoder_id)
    with duckdb.connect(str(stats), read_only=True) as con:
        stats_rows = con.execute(
            "SELECT layer, feature, n_tokens, n_active, round(mean_active, 5), round(max_activation, 5) "
            "FROM feature_stats WHERE transcoder_id = ? ORDER BY ALL",
            [transcoder_id],
        ).fetchall()
        examples = con.execute(
            "SELECT layer, feature, prompt_id, position, round(activation, 5) FROM top_examples "
            "WHERE transcoder_id = ? ORDER BY ALL",
            [transcoder_id],
        ).fetchall()
        effects = con.execute("SELECT count(*) FROM logit_effects WHERE transcoder_id = ?", [transcoder_id]).fetchone()
    return {
        "prompts": sorted(record["prompts"]),
        "instances": record["instances"],
        "edges": record["edges"],
        "features": record["features"],
        "links": record["links"],
        "aggregate": [dataclasses.astuple(r) for r in rows],
        "aggregate_sums": (sum(r.n_prompts for r in rows), sum(r.sum_abs_weight_fx for r in rows)),
        "stats": stats_rows,
        "examples": examples,
        "logit_effects": effects[0] if effects else 0,
    }


def _wipe(driver: Driver, transcoder_id: str) -> None:
    """Remove one transcoder's prompts, instances, features and node (Tokens are shared and stay)."""
    driver.execute_query(
        "MATCH (p:Prompt {transcoder: $t}) MATCH (n:Instance) WHERE n.prompt_id = p.id AND n.node_index IS NOT NULL "
        "DETACH DELETE n",
        t=transcoder_id,
    )
    driver.execute_query("MATCH (p:Prompt {transcoder: $t}) DETACH DELETE p", t=transcoder_id)
    driver.execute_query("MATCH (f:Feature {transcoder: $t}) DETACH DELETE f", t=transcoder_id)
    driver.execute_query("MATCH (t:Transcoder {id: $t}) DETACH DELETE t", t=transcoder_id)


def test_a_renamed_resaved_copy_is_already_stored(
    tmp_path: Path, neo4j_connection: Neo4jConnection, neo4j_driver: Driver
) -> None:
    transcoder = _transcoder("clt")
    first = _save(transcoder, tmp_path / "transcoders", 30.0)
    second = _save(load_transcoder(first), tmp_path / "machine-2" / "transcoders-copy", 31.5)
    stats = tmp_path / "stats.duckdb"
    a = _ingest(tmp_path, first, neo4j_connection, "first", stats)
    assert a.computed == len(PROMPTS) and not a.prompt_failures, a.failures
    before = _state(neo4j_driver, a.transcoder_id, stats)
    b = _ingest(tmp_path, second, neo4j_connection, "second", stats)
    assert b.transcoder_id == a.transcoder_id
    assert (b.already_stored, b.computed) == (len(PROMPTS), 0)
    assert _state(neo4j_driver, a.transcoder_id, stats) == before
    (node,) = [t for t in transcoders(neo4j_driver) if t["id"] == a.transcoder_id]
    assert node["names"] == ["transcoders", "transcoders-copy"]
    assert node["sources"] == [str(first), str(second)]
    assert (node["identity"], node["kind"], node["prompts"]) == ("weights", "clt", len(PROMPTS))


def test_a_local_model_under_another_path_is_the_same_model(
    tmp_path: Path, neo4j_connection: Neo4jConnection, neo4j_driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))
    here = _local_model(tmp_path / "machine-1" / "tiny")
    there = shutil.copytree(here, tmp_path / "machine-2" / "models" / "tiny-llama-copy")
    dictionary = _save(_transcoder("clt"), tmp_path / "transcoders", 3.0)
    stats = tmp_path / "stats.duckdb"
    a = _ingest(tmp_path / "a", dictionary, neo4j_connection, "local-a", stats, model=str(here))
    assert a.computed == len(PROMPTS), a.failures
    b = _ingest(tmp_path / "b", dictionary, neo4j_connection, "local-b", stats, model=str(there))
    assert (b.already_stored, b.computed) == (len(PROMPTS), 0)
    key = model_identity(str(here)).key
    record = neo4j_driver.execute_query(
        "MATCH (m:Model {name: $k}) OPTIONAL MATCH (p:Prompt {model: $k, transcoder: $t}) "
        "RETURN m.names AS names, m.source AS source, m.weights AS weights, count(p) AS prompts",
        k=key, t=a.transcoder_id,
    ).records[0]  # fmt: skip
    assert record["names"] == [str(here), str(there)] and record["source"] == "local-dir"
    assert record["weights"].startswith(key.removeprefix("hf-")) and record["prompts"] == len(PROMPTS)
    _wipe(neo4j_driver, a.transcoder_id)


def _legacy_ingest(tmp: Path, directory: Path, connection: Neo4jConnection, run: str, stats: Path,
                   monkeypatch: pytest.MonkeyPatch) -> str:  # fmt: skip
    """Ingest as the code before schema version 5 did: the transcoder keyed by its directory and file bytes."""
    real = transcoder_identity
    legacy = legacy_transcoder_identity(directory)
    monkeypatch.setattr(ingest.pipeline, "transcoder_identity", lambda d: dataclasses.replace(real(d), id=legacy))
    try:
        report = _ingest(tmp, directory, connection, run, stats)
    finally:
        monkeypatch.setattr(ingest.pipeline, "transcoder_identity", real)
    assert report.transcoder_id == legacy and report.computed == len(PROMPTS), report.failures
    return legacy


def test_migrate_merges_two_copies_into_the_store_one_ingest_builds(
    tmp_path: Path, neo4j_connection: Neo4jConnection, neo4j_driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    transcoder = _transcoder("clt")
    first = _save(transcoder, tmp_path / "transcoders", 30.0)
    second = _save(transcoder, tmp_path / "machine-2" / "transcoders", 44.0)  # `make demo` on another machine
    new_id = transcoder_identity(first).id

    # The reference: one ingest with the weights-keyed id. Recorded, then removed (the ids would collide).
    once_stats = tmp_path / "once.duckdb"
    once = _ingest(tmp_path / "once", first, neo4j_connection, "once", once_stats)
    assert once.transcoder_id == new_id and once.computed == len(PROMPTS)
    reference = _state(neo4j_driver, new_id, once_stats)
    assert reference["aggregate"] and reference["stats"] and reference["examples"]
    _wipe(neo4j_driver, new_id)

    # The old era: both copies ingested under their path-keyed ids, into a version-4 store.
    stats = tmp_path / "legacy.duckdb"
    old_a = _legacy_ingest(tmp_path / "a", first, neo4j_connection, "demo", stats, monkeypatch)
    old_b = _legacy_ingest(tmp_path / "b", second, neo4j_connection, "demo-2", stats, monkeypatch)
    assert old_a != old_b
    for old in (old_a, old_b):
        neo4j_driver.execute_query("MATCH (t:Transcoder {id: $t}) REMOVE t.identity, t.kind, t.config, t.names, "
                                   "t.sources", t=old)  # fmt: skip
    neo4j_driver.execute_query("MATCH (v:SchemaVersion {name: $n}) SET v.version = 4", n=STORE_NAME)
    assert ensure_schema(neo4j_driver) == 5  # the 4 -> 5 migration marks them legacy
    assert {old_a, old_b} <= set(legacy_ids(neo4j_driver))
    split = [_state(neo4j_driver, old, stats) for old in (old_a, old_b)]
    assert [len(s["prompts"]) for s in split] == [len(PROMPTS)] * 2  # every prompt and feature twice
    assert split[0]["features"] == split[1]["features"] == reference["features"]

    # Killed part-way: the statistics merged, the first copy's prompts moved, its features not re-keyed yet.
    def killed(tx: Any, rows: Any, new: str) -> int:
        raise RuntimeError("killed")

    monkeypatch.setattr(identities, "_move_features", killed)
    with pytest.raises(RuntimeError, match="killed"):
        migrate_identities(neo4j_driver, [first, second], stats_db=stats)
    monkeypatch.undo()
    assert {old_a, old_b} <= set(legacy_ids(neo4j_driver))
    assert len(_state(neo4j_driver, new_id, stats)["prompts"]) == len(PROMPTS)  # the first copy's, moved

    report = migrate_identities(neo4j_driver, [first, second], stats_db=stats)  # the rerun finishes the job
    assert report.mapping == {old_a: new_id, old_b: new_id}
    graph = report.graph
    n = len(PROMPTS)
    assert (graph.transcoders_merged, graph.prompts_moved, graph.prompts_deduplicated) == (2, 0, n)
    assert graph.features_rekeyed == graph.features_merged == reference["features"]
    assert graph.aggregates_rebuilt == [new_id]
    assert report.stats == {}  # merged by the killed run already, not again
    merged = _state(neo4j_driver, new_id, stats)
    assert merged == reference
    assert not {old_a, old_b} & {t["id"] for t in transcoders(neo4j_driver)}
    (node,) = [t for t in transcoders(neo4j_driver) if t["id"] == new_id]
    assert node["names"] == ["transcoders"] and sorted(node["sources"]) == sorted([str(first), str(second)])
    assert node["identity"] == "weights" and not node["aggregates_stale"]

    # Idempotent: nothing left to merge, nothing changes; the incremental layer equals a rebuild.
    again = migrate_identities(neo4j_driver, [first, second], stats_db=stats)
    assert again.mapping == {} and again.graph.transcoders_merged == 0 and again.stats == {}
    assert _state(neo4j_driver, new_id, stats) == reference
    rebuild_aggregates(neo4j_driver, transcoder=new_id)
    assert _state(neo4j_driver, new_id, stats) == reference

    # A later ingest through either copy recognises every prompt.
    later = _ingest(tmp_path / "later", second, neo4j_connection, "later", stats)
    assert (later.already_stored, later.computed) == (len(PROMPTS), 0)
    _wipe(neo4j_driver, new_id)


def test_migrate_command_reports_and_needs_no_directory_for_a_clean_store(
    tmp_path: Path, neo4j_connection: Neo4jConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEO4J_URI", neo4j_connection.uri)
    monkeypatch.setenv("NEO4J_USER", neo4j_connection.user)
    monkeypatch.setenv("NEO4J_PASSWORD", neo4j_connection.password)
    first = _save(_transcoder("plt"), tmp_path / "plt-dict", 1.0)
    result = CliRunner().invoke(app, ["db", "migrate", "--transcoders", str(first), "--stats-db",
                                      str(tmp_path / "s.duckdb"), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mapping"] == {} and report["graph"]["transcoders_merged"] == 0
    assert report["dictionaries"][str(first)]["id"] == transcoder_identity(first).id
    bad = CliRunner().invoke(app, ["db", "migrate", "--map", "nonsense"])
    assert bad.exit_code != 0
