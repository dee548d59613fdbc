"""Corpus ingest on Dask against a real Neo4j (session fixtures) and DuckDB, on the tiny model.

Each test saves its own random transcoders (a unique tag added to one decoder bias makes a unique transcoder identity,
which hashes the weights, so prompt ids never collide with another test's) and uses its own run directory and
statistics file. The Dask tests share one module-scoped LocalCluster of two single-threaded worker processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
import torch
from neo4j import Driver
from typer.testing import CliRunner

from atlas.storage.aggregate import aggregate_rows, rebuild_aggregates
from atlas.storage.neo4j_server import LocalNeo4jServer, Neo4jConnection
from atlas.storage.neo4j_writer import GraphWriter
from atlas.storage.queries import AtlasQueries
from atlas.transcoders import TranscoderSpec, build_transcoder, save_transcoder
from atlas_cli.main import app
from ingest.ledger import LEDGER_FILE, Ledger
from ingest.pipeline import IngestOptions, IngestReport, _start_dask, balanced_batch, run_ingest, worker_torch_threads
from ingest.prompts import CorpusError, normalise, prompt_key, read_corpus
from ingest.settings import AttributionSettings, transcoder_identity

MODEL = "tiny-llama"
PROMPTS = [
    ("When Mary and John went to the store, John gave a drink to", "ioi"),
    ("When Tom and Anna went to the park, Anna gave a ball to", "ioi"),
    ("The capital of France is", "capitals"),
    ("The capital of Italy is", "capitals"),
    ("The opposite of hot is", "antonyms"),
    ("The opposite of up is", "antonyms"),
    ("2+3=5, 4+1=5, 3+4=", "addition"),
    ("2+3=5, 4+1=5, 1+2=", "addition"),
]


def make_transcoders(
    directory: Path, seed: int = 3, *, model: str = MODEL, d_model: int = 32, unique: bool = True
) -> Path:
    """Random CLT; `unique`: one decoder bias shifted by a random tag, so its identity is this test's alone."""
    torch.manual_seed(seed)
    transcoder = build_transcoder(TranscoderSpec(kind="clt", n_layers=2, d_model=d_model, n_features=8))
    with torch.no_grad():
        transcoder.b_enc.fill_(0.05)  # about half the features active: small graphs, quick tests
        for layer in range(2):
            transcoder.W_dec[layer].mul_(20)
        if unique:
            transcoder.b_dec[0, 0] += 1e-6 * (1 + uuid.uuid4().int % 1000)
    return save_transcoder(transcoder, directory, model_name=model, metadata={"test_tag": uuid.uuid4().hex})


def write_jsonl(path: Path, prompts: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for text, task in prompts:
            handle.write(json.dumps({"text": text, "task": task}) + "\n")
    return path


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        yield local


@pytest.fixture
def transcoders(tmp_path: Path) -> Path:
    return make_transcoders(tmp_path / "transcoders")


def options(tmp_path: Path, corpus: Path, transcoders: Path, scheduler: str | None, **extra: Any) -> IngestOptions:
    return IngestOptions(
        corpus=corpus,
        transcoders=transcoders,
        model=MODEL,
        scheduler=scheduler,
        run=extra.pop("run", "test"),
        runs_root=extra.pop("runs_root", tmp_path / "runs"),
        stats_db=extra.pop("stats_db", tmp_path / "stats.duckdb"),
        progress=False,
        neo4j_retry_s=extra.pop("neo4j_retry_s", 240.0),
        **extra,
    )


def prompt_ids(driver: Driver, transcoder_id: str) -> list[str]:
    records = driver.execute_query("MATCH (p:Prompt {transcoder: $t}) RETURN p.id AS id", t=transcoder_id).records
    return sorted(r["id"] for r in records)


def store_digest(driver: Driver, ids: list[str]) -> dict[str, Any]:
    """Counts and a content checksum of the prompts `ids` (nodes, edges, prompt properties; floats rounded)."""
    prompts = driver.execute_query(
        "MATCH (p:Prompt) WHERE p.id IN $ids RETURN p.id AS id, p.text AS text, p.task AS task, p.n_nodes AS n, "
        "p.n_edges AS e ORDER BY id",
        ids=ids,
    ).records
    nodes = driver.execute_query(
        "MATCH (n:Instance) WHERE n.prompt_id IN $ids RETURN n.prompt_id AS p, n.node_index AS i, n.node_id AS id, "
        "coalesce(n.activation, n.norm, n.logit) AS v ORDER BY p, i",
        ids=ids,
    ).records
    edges = driver.execute_query(
        "MATCH (a:Instance)-[e:EDGE]->(b:Instance) WHERE a.prompt_id IN $ids "
        "RETURN a.prompt_id AS p, a.node_index AS s, b.node_index AS t, e.weight AS w ORDER BY p, s, t",
        ids=ids,
    ).records
    digest = hashlib.sha256()
    for record in [*prompts, *nodes, *edges]:
        values = [f"{v:.5g}" if isinstance(v, float) else str(v) for v in record.values()]
        digest.update("|".join(values).encode())
    return {"prompts": len(prompts), "distinct": len({r["id"] for r in prompts}), "nodes": len(nodes),
            "edges": len(edges), "checksum": digest.hexdigest()}  # fmt: skip


def stats_rows(path: Path, transcoder_id: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(
            "SELECT layer, feature, n_tokens, n_active, round(mean_active, 4), round(max_activation, 4) "
            "FROM feature_stats WHERE transcoder_id = ? ORDER BY layer, feature",
            [transcoder_id],
        ).fetchall()


def duckdb_tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of a statistics database with all its rows, in a canonical order."""
    with duckdb.connect(str(path), read_only=True) as con:
        names = sorted(row[0] for row in con.execute("SHOW TABLES").fetchall())
        return {name: sorted(con.execute(f'SELECT * FROM "{name}"').fetchall(), key=repr) for name in names}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def assert_same_tables(got: dict[str, list[tuple[Any, ...]]], expected: dict[str, list[tuple[Any, ...]]]) -> None:
    """The same tables with the same rows (floats to a relative 1e-5: runs on other workers may round differently)."""
    assert sorted(got) == sorted(expected)
    assert "logit_effects" in expected and all(expected.values())
    for name, rows in expected.items():
        assert len(got[name]) == len(rows), name
        assert _same(got[name], rows), name


def delete_prompts(driver: Driver, ids: list[str]) -> None:
    writer = GraphWriter(driver)
    for pid in ids:
        writer.delete_prompt(pid)


# -- pure parts ------------------------------------------------------------------------------------------------


def test_normalise_and_prompt_key() -> None:
    assert normalise("  Cafe\u0301\t au  lait \n") == "Café au lait"
    key = prompt_key("a", model="m", transcoder_id="t", settings={"x": 1})
    assert len(key) == 20
    assert key != prompt_key("a", model="m", transcoder_id="t", settings={"x": 2})
    assert key != prompt_key("b", model="m", transcoder_id="t", settings={"x": 1})
    assert key != prompt_key("a", model="m", transcoder_id="u", settings={"x": 1})
    assert balanced_batch(100, 2) == 8 and balanced_batch(3, 2) == 1


def test_transcoder_identity_follows_content(tmp_path: Path) -> None:
    a = make_transcoders(tmp_path / "a", seed=1)
    ident = transcoder_identity(a)
    assert transcoder_identity(a) == ident and ident.startswith("clt-")
    (tmp_path / "copy").mkdir()
    for path in a.iterdir():
        (tmp_path / "copy" / path.name).write_bytes(path.read_bytes())
    assert transcoder_identity(tmp_path / "copy") == ident  # the id no longer holds the directory's name
    b = make_transcoders(tmp_path / "b", seed=2)
    assert transcoder_identity(b) != ident


def test_read_corpus_formats_and_bad_lines(tmp_path: Path) -> None:
    text = tmp_path / "c.txt"
    text.write_bytes(b"first  prompt\n\n  second\tprompt \n\xff\xfe broken\n   \n")
    records, issues = read_corpus(text)
    assert [r.text for r in records] == ["first prompt", "second prompt"]
    assert [r.line for r in records] == [1, 3]
    assert len(issues) == 1 and issues[0].line == 4 and "not valid UTF-8" in issues[0].error

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "a b", "task": "ioi", "answer": " Mary"}\n{"prompt": "x"}\nnot json\n{"text": " "}\n')
    records, issues = read_corpus(jsonl)
    assert records[0].text == "a b" and records[0].meta == {"task": "ioi", "answer": " Mary"}
    assert {i.line: i.error.split(" (")[0] for i in issues} == {
        2: "no field 'text'",
        3: "invalid JSON",
        4: "the prompt is empty after normalisation",
    }

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"prompt": ["p one", None, "p two"], "task": ["t", "t", None]}), parquet)
    records, issues = read_corpus(parquet, text_field="prompt")
    assert [(r.text, r.meta) for r in records] == [("p one", {"task": "t"}), ("p two", {})]
    assert [i.line for i in issues] == [2]


def test_read_corpus_whole_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="is empty"):
        read_corpus(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    with pytest.raises(CorpusError, match="is empty"):
        read_corpus(tmp_path / "blank.txt")
    (tmp_path / "f.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(CorpusError, match="no record has the field 'text'"):
        read_corpus(tmp_path / "f.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "f.parquet")
    with pytest.raises(CorpusError, match="no column 'text'"):
        read_corpus(tmp_path / "f.parquet")


def test_cli_reports_bad_corpus_clearly(tmp_path: Path, transcoders: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", "--corpus", str(tmp_path / "nope.jsonl"), "--transcoders",
                                 str(transcoders), "--model", MODEL])  # fmt: skip
    assert result.exit_code == 2
    assert "does not exist" in " ".join(result.output.split())
    (tmp_path / "f.jsonl").write_text('{"prompt": "a"}\n')
    result = runner.invoke(app, ["ingest", "--corpus", str(tmp_path / "f.jsonl"), "--transcoders", str(transcoders),
                                 "--model", MODEL, "--text-field", "body"])  # fmt: skip
    assert result.exit_code == 2 and "no record has the field 'body'" in " ".join(result.output.split())


def test_ledger_folds_events_and_ignores_a_torn_line(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "r")
    ledger.failed("p1", kind="prompt", error="too long", line=3)
    ledger.failed("p2", kind="task", error="boom")
    ledger.done(["p3"])
    ledger.close()
    with (tmp_path / LEDGER_FILE).open("a") as handle:
        handle.write('{"prompt_id": "p4", "sta')
    state = Ledger(tmp_path, "r").read()
    assert state.done == {"p3"}
    assert set(state.deterministic_failures()) == {"p1"}


# -- end to end ------------------------------------------------------------------------------------------------


def test_end_to_end_corpus_to_neo4j_and_duckdb(
    tmp_path: Path, transcoders: Path, cluster: Any, neo4j_connection: Neo4jConnection, neo4j_driver: Driver
) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [*PROMPTS, (PROMPTS[0][0] + "  ", "ioi")])  # one duplicate
    opts = options(tmp_path, corpus, transcoders, cluster.scheduler_address)
    shards: list[dict[str, Any]] = []
    report = run_ingest(opts, connection=neo4j_connection, on_shard=shards.append)
    tid = report.transcoder_id
    ids = prompt_ids(neo4j_driver, tid)
    try:
        assert (report.prompts, report.duplicates, report.computed) == (len(PROMPTS), 1, len(PROMPTS))
        assert report.prompt_failures == report.task_failures == report.input_failures == 0
        assert len(ids) == len(PROMPTS)
        assert {s["worker_pid"] for s in shards} and sum(len(s["done"]) for s in shards) == len(PROMPTS)
        # every prompt's nodes and edges are there, tagged with task and run
        rows = neo4j_driver.execute_query(
            "MATCH (p:Prompt) WHERE p.id IN $ids OPTIONAL MATCH (n:Instance)-[:IN]->(p) "
            "WITH p, count(n) AS n RETURN p.task AS task, p.run AS run, p.n_nodes AS expected, n, p.n_tokens AS tok",
            ids=ids,
        ).records
        assert all(r["n"] == r["expected"] > 0 and r["run"] == "test" for r in rows)
        assert sorted(r["task"] for r in rows) == sorted(t for _, t in PROMPTS)
        digest = store_digest(neo4j_driver, ids)
        assert digest["nodes"] == report.nodes_written and digest["edges"] == report.edges_written > 0
        # a sample path query (the query library): from a feature to a logit it reaches inside one prompt
        sample = neo4j_driver.execute_query(
            "MATCH (a:FeatureActivation)-[:EDGE*1..2]->(l:LogitTarget) WHERE a.prompt_id IN $ids "
            "AND l.prompt_id = a.prompt_id MATCH (a)-[:OF]->(f:Feature) RETURN f.key AS key, l.label AS label LIMIT 1",
            ids=ids,
        ).records[0]
        paths = AtlasQueries(neo4j_driver).paths_to_logits(sample["key"], sample["label"], prompt_ids=ids, model=MODEL)
        assert len(paths) > 0
        assert all(p.prompt_id in ids and p.source_key == sample["key"] and 1 <= p.hops <= 3 for p in paths.rows)
        # the aggregate layer covers the ingested prompts
        aggregates = aggregate_rows(neo4j_driver, transcoder=tid)
        assert aggregates and all(1 <= a.n_prompts <= len(ids) for a in aggregates)
        # DuckDB: statistics over exactly the ingested tokens
        total_tokens = sum(r["tok"] for r in rows)
        stats = stats_rows(tmp_path / "stats.duckdb", tid)
        assert len(stats) == 2 * 8 and {r[2] for r in stats} == {total_tokens}
        assert any(r[3] > 0 for r in stats)
        with duckdb.connect(str(tmp_path / "stats.duckdb"), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM logit_effects WHERE transcoder_id = ?", [tid]).fetchone()[0] > 0
            examples = con.execute("SELECT DISTINCT prompt_id FROM top_examples WHERE transcoder_id = ?", [tid])
            assert {r[0] for r in examples.fetchall()} <= set(ids)
        report_json = json.loads((tmp_path / "runs" / "test" / "report.json").read_text())
        assert report_json["computed"] == len(PROMPTS) and "compute_and_load" in report_json["timings"]
        # a rerun finds everything stored and computes nothing
        again = run_ingest(opts, connection=neo4j_connection)
        assert (again.already_stored, again.computed, again.edges_written) == (len(PROMPTS), 0, 0)
        assert store_digest(neo4j_driver, ids) == digest
        assert stats_rows(tmp_path / "stats.duckdb", tid) == stats
    finally:
        delete_prompts(neo4j_driver, ids)


def test_bad_prompts_are_recorded_and_valid_ones_ingested(
    tmp_path: Path, transcoders: Path, cluster: Any, neo4j_connection: Neo4jConnection, neo4j_driver: Driver
) -> None:
    corpus = tmp_path / "bad.jsonl"
    too_long = "word " * 40  # the tiny model's context is 64 characters
    lines = [json.dumps({"text": PROMPTS[0][0]}).encode(), b'{"text": "caf\xe9 broken"}',
             json.dumps({"txt": "x"}).encode(), json.dumps({"text": " \t "}).encode(),
             json.dumps({"text": too_long}).encode(), json.dumps({"text": PROMPTS[2][0]}).encode()]  # fmt: skip
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    opts = options(tmp_path, corpus, transcoders, cluster.scheduler_address)
    report = run_ingest(opts, connection=neo4j_connection)
    ids = prompt_ids(neo4j_driver, report.transcoder_id)
    try:
        assert report.computed == 2 and len(ids) == 2
        assert report.input_failures == 3 and report.prompt_failures == 1
        errors = {f.get("line"): f["error"] for f in report.failures}
        assert "not valid UTF-8" in errors[2] and "no field 'text'" in errors[3] and "empty" in errors[4]
        assert "more than the context length" in errors[5]
        state = Ledger(tmp_path / "runs" / "test", "test").read()
        assert len(state.deterministic_failures()) == 1
        again = run_ingest(opts, connection=neo4j_connection)
        assert (again.computed, again.already_stored, again.skipped_known_failures) == (0, 2, 1)
    finally:
        delete_prompts(neo4j_driver, ids)


def test_answer_targets_and_unknown_target_token(
    tmp_path: Path, transcoders: Path, cluster: Any, neo4j_connection: Neo4jConnection, neo4j_driver: Driver
) -> None:
    corpus = tmp_path / "answers.jsonl"
    corpus.write_text(json.dumps({"text": "The capital of France is", "answer": " Paris", "task": "capitals"}) + "\n"
                      + json.dumps({"text": "The opposite of hot is"}) + "\n")  # fmt: skip
    settings = AttributionSettings(targets=("answer",))
    report = run_ingest(options(tmp_path, corpus, transcoders, cluster.scheduler_address, settings=settings),
                        connection=neo4j_connection)  # fmt: skip
    ids = prompt_ids(neo4j_driver, report.transcoder_id)
    try:
        assert report.computed == 1 and report.prompt_failures == 1
        assert "no 'answer' field" in report.failures[0]["error"]
        labels = neo4j_driver.execute_query("MATCH (p:Prompt {id: $id}) RETURN p.targets AS t", id=ids[0]).records
        assert labels[0]["t"] == [" "]  # the tiny character tokenizer: the answer's first token
    finally:
        delete_prompts(neo4j_driver, ids)


def _worker_threads() -> tuple[str | None, str | None, int]:
    import torch as worker_torch  # first imported in the worker process here, so its pools are sized now

    return os.environ.get("OMP_NUM_THREADS"), os.environ.get("MALLOC_TRIM_THRESHOLD_"), worker_torch.get_num_threads()


def test_local_cluster_workers_get_their_share_of_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Dask's nanny starts workers with OMP_NUM_THREADS=1, which would pin torch to one core whatever a task asks
    # for, and with MALLOC_TRIM_THRESHOLD_ set, which halves attribution's speed; it also leaves both in this
    # process's environment for good (as an earlier nanny would have: set here), so a second cluster is checked too.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for _ in range(2):
        client, cluster, n_workers = _start_dask(IngestOptions(tmp_path / "c.txt", tmp_path, "tiny-llama", workers=1))
        try:
            ((variable, trim, threads),) = client.run(_worker_threads).values()
        finally:
            client.close()
            cluster.close()
        expected = worker_torch_threads(1)
        assert n_workers == 1 and expected == (os.cpu_count() or 1)
        assert variable == str(expected) and threads == expected
        assert trim is None
    # this process's environment as it was
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536" and os.environ["OMP_NUM_THREADS"] == "1"


# -- faults ------------------------------------------------------------------------------------------------------


def clean_reference(
    tmp_path: Path,
    corpus: Path,
    transcoders: Path,
    scheduler: str,
    connection: Neo4jConnection,
    driver: Driver,
    **extra: Any,
) -> tuple[IngestReport, dict[str, Any], list[tuple[Any, ...]], dict[str, list[tuple[Any, ...]]]]:
    """A clean run's store digest, statistics and every DuckDB table; its prompts are deleted again afterwards.

    Pass the faulted run's `batch_prompts`: the shard bookkeeping tables record one row per batch.
    """
    report = run_ingest(options(tmp_path, corpus, transcoders, scheduler, run="clean", stats_db=tmp_path / "clean.db",
                                **extra), connection=connection)  # fmt: skip
    ids = prompt_ids(driver, report.transcoder_id)
    digest = store_digest(driver, ids)
    stats = stats_rows(tmp_path / "clean.db", report.transcoder_id)
    tables = duckdb_tables(tmp_path / "clean.db")
    delete_prompts(driver, ids)
    assert prompt_ids(driver, report.transcoder_id) == []
    return report, digest, stats, tables


def many_prompts(n: int) -> list[tuple[str, str]]:
    names = ["Mary", "John", "Tom", "Anna", "Kate", "Paul"]
    return [(f"When {names[i % 6]} and {names[(i + 1) % 6]} met, {names[(i + 1) % 6]} gave {i} to", "ioi")
            for i in range(n)]  # fmt: skip


def test_kill_a_worker_mid_run(
    tmp_path: Path, transcoders: Path, cluster: Any, neo4j_connection: Neo4jConnection, neo4j_driver: Driver
) -> None:
    from distributed import Client

    corpus = write_jsonl(tmp_path / "corpus.jsonl", many_prompts(16))
    _, reference, ref_stats, ref_tables = clean_reference(tmp_path, corpus, transcoders, cluster.scheduler_address,
                                                          neo4j_connection, neo4j_driver, batch_prompts=1)  # fmt: skip
    killed: list[int] = []
    with Client(cluster) as client:

        def kill_busy_worker(summary: dict[str, Any]) -> None:
            if killed:
                return
            busy = [w for w, keys in client.processing().items() if keys] or list(client.processing())
            pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        report = run_ingest(options(tmp_path, corpus, transcoders, cluster.scheduler_address, batch_prompts=1),
                            connection=neo4j_connection, on_shard=kill_busy_worker)  # fmt: skip
        client.wait_for_workers(2, timeout=300)
        pids = set(client.run(os.getpid).values())
    ids = prompt_ids(neo4j_driver, report.transcoder_id)
    try:
        assert killed and killed[0] not in pids  # the nanny replaced the killed worker
        assert report.computed == 16 and report.task_failures == 0
        assert store_digest(neo4j_driver, ids) == reference
        assert stats_rows(tmp_path / "stats.duckdb", report.transcoder_id) == ref_stats
        assert_same_tables(duckdb_tables(tmp_path / "stats.duckdb"), ref_tables)
    finally:
        delete_prompts(neo4j_driver, ids)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kill_the_whole_ingest_then_rerun(
    tmp_path: Path, transcoders: Path, cluster: Any, neo4j_connection: Neo4jConnection, neo4j_driver: Driver
) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", many_prompts(24))
    _, reference, ref_stats, ref_tables = clean_reference(tmp_path, corpus, transcoders, cluster.scheduler_address,
                                                          neo4j_connection, neo4j_driver, batch_prompts=1)  # fmt: skip
    env = {**os.environ, "NEO4J_URI": neo4j_connection.uri, "NEO4J_USER": neo4j_connection.user,
           "NEO4J_PASSWORD": neo4j_connection.password, "ATLAS_STATS_DB": str(tmp_path / "stats.duckdb"),
           "ATLAS_RUNS_DIR": str(tmp_path / "runs")}  # fmt: skip
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    command = [sys.executable, "-m", "atlas_cli", "ingest", "--corpus", str(corpus), "--transcoders",
               str(transcoders), "--model", MODEL, "--workers", "1", "--run", "test", "--batch-size", "1"]  # fmt: skip
    ledger = tmp_path / "runs" / "test" / LEDGER_FILE
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if ledger.exists() and ledger.read_text().count('"done"') >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the ingest finished (or died) before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for _ in range(100):
            if not _group_alive(proc.pid):
                break
            time.sleep(0.1)
        assert not _group_alive(proc.pid), "processes of the killed ingest survived"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (tmp_path / "runs" / "test" / "report.json").exists()
    report = run_ingest(options(tmp_path, corpus, transcoders, cluster.scheduler_address, batch_prompts=1),
                        connection=neo4j_connection)  # fmt: skip
    ids = prompt_ids(neo4j_driver, report.transcoder_id)
    try:
        assert report.already_stored + report.resumed_from_shards >= 3
        assert report.done == 24 and report.computed < 24
        assert store_digest(neo4j_driver, ids) == reference  # same counts and content, no duplicate prompts
        assert reference["distinct"] == reference["prompts"] == 24
        assert stats_rows(tmp_path / "stats.duckdb", report.transcoder_id) == ref_stats
        assert_same_tables(duckdb_tables(tmp_path / "stats.duckdb"), ref_tables)  # every table, every row
        # the aggregate layer, maintained per shard, counts every prompt once: it equals a rebuild from scratch
        incremental = aggregate_rows(neo4j_driver, transcoder=report.transcoder_id)
        rebuild_aggregates(neo4j_driver, transcoder=report.transcoder_id)
        assert incremental and aggregate_rows(neo4j_driver, transcoder=report.transcoder_id) == incremental
    finally:
        delete_prompts(neo4j_driver, ids)


def test_neo4j_restart_mid_ingest(
    tmp_path: Path,
    transcoders: Path,
    cluster: Any,
    local_neo4j_server: LocalNeo4jServer,
    neo4j_connection: Neo4jConnection,
    neo4j_driver: Driver,
) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", many_prompts(12))
    port = int(local_neo4j_server.status()["port"])
    window: dict[str, float] = {}
    restarter: list[threading.Thread] = []

    def on_shard(summary: dict[str, Any]) -> None:
        if window:
            return
        window["first_loaded"] = time.time()
        local_neo4j_server.stop()  # the loader finds the server down at its next shard
        window["down"] = time.time()

        def start() -> None:
            time.sleep(3.0)
            local_neo4j_server.start(port=port)
            window["up"] = time.time()

        restarter.append(threading.Thread(target=start))
        restarter[0].start()

    try:
        report = run_ingest(options(tmp_path, corpus, transcoders, cluster.scheduler_address, batch_prompts=1),
                            connection=neo4j_connection, on_shard=on_shard)  # fmt: skip
    finally:
        if restarter:
            restarter[0].join(timeout=300)
    ids = prompt_ids(neo4j_driver, report.transcoder_id)
    try:
        assert "up" in window, "the server did not come back"
        assert report.computed == 12 and len(ids) == 12 and report.task_failures == 0
        written = neo4j_driver.execute_query(
            "MATCH (p:Prompt) WHERE p.id IN $ids RETURN p.ingested_at.epochMillis / 1000.0 AS t", ids=ids
        ).records
        times = sorted(r["t"] for r in written)
        assert times[0] <= window["down"] and times[-1] >= window["up"]  # the ingest spanned the outage
        assert sum(t >= window["up"] for t in times) >= 1
        digest = store_digest(neo4j_driver, ids)
        assert digest["prompts"] == digest["distinct"] == 12 and digest["edges"] == report.edges_written
    finally:
        delete_prompts(neo4j_driver, ids)


def test_state_capital_set_is_shipped_unfiltered_with_answers() -> None:
    """The Dallas/state-capital set: every generated prompt is shipped (none filtered by the model), tagged with its
    task and correct capital, with the model's check recorded; Dallas appears in every template."""
    from ingest.demo_corpus import STATE_CAPITALS_TASK, state_capital_prompts, state_capitals_path

    generated = state_capital_prompts()
    shipped = [json.loads(line) for line in state_capitals_path().read_text(encoding="utf-8").splitlines() if line]
    assert len(generated) >= 8
    assert [(r["text"], r["answer"]) for r in shipped] == [(p.text, p.answer) for p in generated]
    assert all(r["task"] == STATE_CAPITALS_TASK and {"p_answer", "top1", "model_top1"} <= set(r) for r in shipped)
    dallas = [p for p in generated if "Dallas" in p.text]
    assert len({p.template for p in dallas}) == len({p.template for p in generated}) >= 2
    assert {p.answer for p in dallas} == {" Austin"}
    records, issues = read_corpus(state_capitals_path())
    assert not issues and all(r.meta == {"task": STATE_CAPITALS_TASK, "answer": g.answer}
                              for r, g in zip(records, generated, strict=True))  # fmt: skip


# -- refused up front, nothing left behind ---------------------------------------------------------------------------


def bad_dictionary(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A transcoder directory the ingest must refuse, and (a regex of) the message it must give."""
    if kind == "sizes":
        return make_transcoders(tmp_path / "narrow", d_model=16), r"do not fit model 'tiny-llama': d_model 16 vs"
    if kind == "other-model":  # the same sizes, trained on the other tiny model
        directory = make_transcoders(tmp_path / "gpt2", model="tiny-gpt2")
        return directory, r"do not fit model 'tiny-llama': they were trained on 'tiny-gpt2'"
    directory = make_transcoders(tmp_path / "corrupt")
    weights = directory / "W_dec_1.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    return directory, r"W_dec_1\.safetensors: not a readable safetensors file"


@pytest.mark.parametrize("kind", ["sizes", "other-model", "corrupt"])
def test_a_bad_dictionary_is_refused_before_anything_starts(
    tmp_path: Path, kind: str, neo4j_driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ingest.pipeline as pipeline
    from atlas.transcoders import TranscoderFormatError

    directory, message = bad_dictionary(tmp_path, kind)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", PROMPTS[:2])

    def never(*_: Any, **__: Any) -> Any:
        raise AssertionError("the ingest went on past its checks")

    monkeypatch.setattr(pipeline, "open_connection", never)  # no Neo4j (not even the managed server's start)
    monkeypatch.setattr(pipeline, "_start_dask", never)
    monkeypatch.setattr(pipeline, "read_corpus", never)
    before = GraphWriter(neo4j_driver).store_counts()
    for workers in (0, None):
        with pytest.raises(TranscoderFormatError, match=message):
            run_ingest(options(tmp_path, corpus, directory, None, workers=workers))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "stats.duckdb").exists()
    assert GraphWriter(neo4j_driver).store_counts() == before
    # the command line: one line, status 2, and still nothing created
    result = CliRunner().invoke(app, ["ingest", "--corpus", str(corpus), "--transcoders", str(directory), "--model",
                                      MODEL, "--runs-root", str(tmp_path / "runs"), "--stats-db",
                                      str(tmp_path / "stats.duckdb")])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert re.search(message.split(": ", 1)[-1], " ".join(result.output.split()))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "stats.duckdb").exists()


def test_the_command_line_refuses_without_importing_the_pipeline(tmp_path: Path) -> None:
    directory, _ = bad_dictionary(tmp_path, "sizes")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", PROMPTS[:1])
    code = (
        "import sys; from atlas_cli.main import app\n"
        "try:\n    app(sys.argv[1:])\n"
        "except SystemExit as e:\n    print('status', e.code, sorted(m for m in ('torch', 'distributed', 'neo4j',"
        " 'ingest.pipeline') if m in sys.modules))\n"
    )
    command = [sys.executable, "-c", code, "ingest", "--corpus", str(corpus), "--transcoders", str(directory),
               "--model", MODEL, "--runs-root", str(tmp_path / "runs")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert "d_model 16 vs the model's 32" in done.stderr
    assert done.stdout.strip().endswith("status 2 []")
    assert not (tmp_path / "runs").exists()


def test_a_run_that_fails_before_any_shard_removes_its_run_directory(
    tmp_path: Path, neo4j_connection: Neo4jConnection, neo4j_driver: Driver
) -> None:
    from safetensors.torch import load_file, save_file

    from atlas.transcoders import TranscoderFormatError

    directory = make_transcoders(tmp_path / "nan")  # intact files (the checks pass): NaN found when it is loaded
    tensors = load_file(directory / "W_enc_0.safetensors")
    tensors["b_enc_0"][0] = float("nan")
    save_file(tensors, str(directory / "W_enc_0.safetensors"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(PROMPTS[0][0].encode() + b"\n\xff bad line\n")  # an input failure goes to the ledger first
    before = GraphWriter(neo4j_driver).store_counts()
    with pytest.raises(TranscoderFormatError, match="NaN"):
        run_ingest(options(tmp_path, corpus, directory, None, workers=0), connection=neo4j_connection)
    assert not (tmp_path / "runs" / "test").exists() and not (tmp_path / "stats.duckdb").exists()
    assert GraphWriter(neo4j_driver).store_counts() == before


def test_a_run_whose_every_prompt_fails_registers_nothing(
    tmp_path: Path, transcoders: Path, neo4j_connection: Neo4jConnection, neo4j_driver: Driver
) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", PROMPTS[2:3])
    first = run_ingest(options(tmp_path, good, transcoders, None, workers=0, run="good"), connection=neo4j_connection)
    ids = prompt_ids(neo4j_driver, first.transcoder_id)
    try:
        assert first.computed == 1 and len(ids) == 1
        tables = duckdb_tables(tmp_path / "stats.duckdb")
        assert len(tables["ingested_shards"]) == 1
        too_long = "word " * 40  # more characters than the tiny model's context
        bad = write_jsonl(tmp_path / "bad.jsonl", [(too_long + "a", "x"), (too_long + "b", "x")])
        for stats_db in (tmp_path / "stats.duckdb", tmp_path / "fresh.duckdb"):
            report = run_ingest(options(tmp_path, bad, transcoders, None, workers=0, run=f"bad-{stats_db.stem}",
                                        stats_db=stats_db, batch_prompts=2), connection=neo4j_connection)  # fmt: skip
            assert (report.prompt_failures, report.computed, report.done) == (2, 0, 0)
            shards = list((tmp_path / "runs" / f"bad-{stats_db.stem}" / "shards").glob("*/summary.json"))
            assert len(shards) == 1  # the shard is there (a rerun skips its failures), but registered nowhere
        assert duckdb_tables(tmp_path / "stats.duckdb") == tables
        assert not (tmp_path / "fresh.duckdb").exists()
        assert prompt_ids(neo4j_driver, first.transcoder_id) == ids
    finally:
        delete_prompts(neo4j_driver, prompt_ids(neo4j_driver, first.transcoder_id))


def test_rerun_after_neo4j_was_killed_equals_a_clean_run_in_both_stores(
    tmp_path: Path,
    transcoders: Path,
    cluster: Any,
    local_neo4j_server: LocalNeo4jServer,
    neo4j_connection: Neo4jConnection,
    neo4j_driver: Driver,
) -> None:
    """Neo4j is killed once every shard is computed: the run fails; the rerun completes from its shards alone (nothing
    left to compute) and must leave both stores as a clean run does, DuckDB's logit effects included."""
    n = 8
    corpus = write_jsonl(tmp_path / "corpus.jsonl", many_prompts(n))
    _, reference, _, ref_tables = clean_reference(tmp_path, corpus, transcoders, cluster.scheduler_address,
                                                  neo4j_connection, neo4j_driver, batch_prompts=1)  # fmt: skip
    port = int(local_neo4j_server.status()["port"])
    shard_root = tmp_path / "runs" / "test" / "shards"
    killed: list[int] = []

    def kill_neo4j_once_all_computed(summary: dict[str, Any]) -> None:
        if killed:
            return
        deadline = time.monotonic() + 240
        while len(list(shard_root.glob("*/summary.json"))) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = int(local_neo4j_server.status()["pid"])
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        while local_neo4j_server.status()["running"] and time.monotonic() < deadline:
            time.sleep(0.1)

    try:
        with pytest.raises(RuntimeError, match="Neo4j still unavailable"):
            run_ingest(options(tmp_path, corpus, transcoders, cluster.scheduler_address, batch_prompts=1,
                               neo4j_retry_s=1.0), connection=neo4j_connection,
                       on_shard=kill_neo4j_once_all_computed)  # fmt: skip
    finally:
        if killed:
            local_neo4j_server.start(port=port)
    assert killed and len(list(shard_root.glob("*/summary.json"))) == n
    report = run_ingest(options(tmp_path, corpus, transcoders, cluster.scheduler_address, batch_prompts=1),
                        connection=neo4j_connection)  # fmt: skip
    ids = prompt_ids(neo4j_driver, report.transcoder_id)
    try:
        assert report.computed == 0 and report.already_stored >= 1
        assert report.already_stored + report.resumed_from_shards == n
        assert store_digest(neo4j_driver, ids) == reference
        assert_same_tables(duckdb_tables(tmp_path / "stats.duckdb"), ref_tables)
    finally:
        delete_prompts(neo4j_driver, ids)
