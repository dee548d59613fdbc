"""Corpus ingest on Dask against a real Neo4j (session fixtures) and DuckDB, on the tiny model.

Each test saves its own random transcoders (a unique tag added to one decoder bias makes a unique transcoder identity,
which hashes the weights, so prompt ids never collide with another test's) and uses its own run directory and
statistics file. The Dask tests share one module-scoped LocalCluster of two single-threaded worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def make_transcoders(directory: Path, seed: int = 3, *, unique: bool = True) -> Path:
    """Random CLT; `unique`: one decoder bias shifted by a random tag, so its identity is this test's alone."""
    torch.manual_seed(seed)
    transcoder = build_transcoder(TranscoderSpec(kind="clt", n_layers=2, d_model=32, n_features=8))
    with torch.no_grad():
        transcoder.b_enc.fill_(0.05)  # about half the features active: small graphs, quick tests
        for layer in range(2):
            transcoder.W_dec[layer].mul_(20)
        if unique:
            transcoder.b_dec[0, 0] += 1e-6 * (1 + uuid.uuid4().int % 1000)
    return save_transcoder(transcoder, directory, model_name=MODEL, metadata={"test_tag": uuid.uuid4().hex})


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
    tmp_path: Path, corpus: Path, transcoders: Path, scheduler: str, connection: Neo4jConnection, driver: Driver
) -> tuple[IngestReport, dict[str, Any], list[tuple[Any, ...]]]:
    """A clean run's store digest and statistics; its prompts are deleted again afterwards."""
    report = run_ingest(options(tmp_path, corpus, transcoders, scheduler, run="clean", stats_db=tmp_path / "clean.db"),
                        connection=connection)  # fmt: skip
    ids = prompt_ids(driver, report.transcoder_id)
    digest = store_digest(driver, ids)
    stats = stats_rows(tmp_path / "clean.db", report.transcoder_id)
    delete_prompts(driver, ids)
    assert prompt_ids(driver, report.transcoder_id) == []
    return report, digest, stats


def many_prompts(n: int) -> list[tuple[str, str]]:
    names = ["Mary", "John", "Tom", "Anna", "Kate", "Paul"]
    return [(f"When {names[i % 6]} and {names[(i + 1) % 6]} met, {names[(i + 1) % 6]} gave {i} to", "ioi")
            for i in range(n)]  # fmt: skip


def test_kill_a_worker_mid_run(
    tmp_path: Path, transcoders: Path, cluster: Any, neo4j_connection: Neo4jConnection, neo4j_driver: Driver
) -> None:
    from distributed import Client

    corpus = write_jsonl(tmp_path / "corpus.jsonl", many_prompts(16))
    _, reference, ref_stats = clean_reference(tmp_path, corpus, transcoders, cluster.scheduler_address,
                                              neo4j_connection, neo4j_driver)  # fmt: skip
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
    _, reference, ref_stats = clean_reference(tmp_path, corpus, transcoders, cluster.scheduler_address,
                                              neo4j_connection, neo4j_driver)  # fmt: skip
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
    report = run_ingest(options(tmp_path, corpus, transcoders, cluster.scheduler_address),
                        connection=neo4j_connection)  # fmt: skip
    ids = prompt_ids(neo4j_driver, report.transcoder_id)
    try:
        assert report.already_stored + report.resumed_from_shards >= 3
        assert report.done == 24 and report.computed < 24
        assert store_digest(neo4j_driver, ids) == reference  # same counts and content, no duplicate prompts
        assert reference["distinct"] == reference["prompts"] == 24
        assert stats_rows(tmp_path / "stats.duckdb", report.transcoder_id) == ref_stats
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
