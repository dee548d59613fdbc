"""Faults against the session's managed local Neo4j: a server killed and restarted in the middle of a write loop,
and a server that is down. Nothing stored may be lost or duplicated: after the faulted loop, counts and a content
checksum (every prompt's nodes, edges and properties, and the transcoder's aggregate layer) must equal those of a
clean run of the same loop.

These tests restart the session server (same port, same data), so they skip unless the session runs its own
`LocalNeo4jServer` (not with `NEO4J_URI` or a container).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
from neo4j import Driver, GraphDatabase
from test_neo4j_writer import Graph, Names, checksum, delete_named, make_graph, snapshot

from atlas.storage.aggregate import aggregate_rows
from atlas.storage.neo4j_server import LocalNeo4jServer, Neo4jConnection, free_loopback_port
from atlas.storage.neo4j_writer import GraphWriter, StoreCounts, StoreUnavailableError

N_PROMPTS = 24
FAULT_AT = 8  # the prompt whose transaction is open when the server goes down


def graphs_for(names: Names, seed: int) -> list[Graph]:
    """N_PROMPTS small prompt graphs whose features recur across prompts (so aggregates are shared)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(N_PROMPTS):
        feats = {(int(rng.integers(0, 4)), int(rng.integers(0, 3)), int(rng.integers(0, 6))) for _ in range(8)}
        features = [(layer, pos, idx, float(rng.uniform(0.1, 3))) for layer, pos, idx in sorted(feats)]
        n = len(features) + 2 + 3 + 2
        pairs = sorted({(int(s), int(t)) for s, t in rng.integers(0, n, (40, 2)) if s < t})
        edges = [(s, t, float(np.float32(rng.normal(0, 0.5)))) for s, t in pairs]
        out.append(make_graph(names, names.prompt(f"f{i}"), features=features, edges=edges))
    return out


def store_state(driver: Driver, db: str, names: Names, graphs: list[Graph]) -> tuple[StoreCounts, str]:
    """Counts plus one checksum over every prompt's snapshot and the transcoder's aggregate rows."""
    parts: dict[str, Any] = {g[0]["id"]: snapshot(driver, db, g[0]["id"]) for g in graphs}
    parts["aggregates"] = [list(vars(r).values()) for r in aggregate_rows(driver, db, transcoder=names.transcoder)]
    return GraphWriter(driver, db).store_counts(), checksum(parts)


def kill_and_restart(server: LocalNeo4jServer, port: int, *, hard: bool) -> float:
    """SIGKILL (hard) or a clean stop of the running server, then a start on the same port; returns seconds down."""
    started = time.monotonic()
    if hard:
        state = server.status()
        assert state["running"] and state["pid"]
        os.kill(int(state["pid"]), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while server.status()["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
    else:
        server.stop()
    server.start(port=port)
    return time.monotonic() - started


@pytest.fixture
def names(neo4j_driver: Driver, neo4j_connection: Neo4jConnection) -> Iterator[Names]:
    names = Names()
    yield names
    delete_named(neo4j_driver, neo4j_connection.database, names)


def clean_rerun_state(driver: Driver, db: str, names: Names, graphs: list[Graph]) -> tuple[StoreCounts, str]:
    """Delete the loop's prompts, check nothing of them is left, write them again without faults; the state."""
    writer = GraphWriter(driver, db)
    for g in graphs:
        assert writer.delete_prompt(g[0]["id"])
    assert aggregate_rows(driver, db, transcoder=names.transcoder) == []
    writer.write_prompts(graphs)
    return store_state(driver, db, names, graphs)


@pytest.mark.parametrize("pipelined", [False, True], ids=["in-transaction", "pipelined"])
def test_server_killed_mid_write_loop_retries_and_loses_or_duplicates_nothing(
    local_neo4j_server: LocalNeo4jServer, neo4j_connection: Neo4jConnection, names: Names, pipelined: bool
) -> None:
    """Killed while a prompt's transaction is open (and, pipelined, while the background aggregator may be adding
    earlier prompts): the driver's retries ride through the restart, and the store ends as a clean run leaves it."""
    port = urlparse(neo4j_connection.uri).port
    assert port is not None
    db = neo4j_connection.database
    auth = (neo4j_connection.user, neo4j_connection.password)
    # A retry budget longer than a restart: the driver's managed transaction rides through it.
    with GraphDatabase.driver(neo4j_connection.uri, auth=auth, max_transaction_retry_time=300) as driver:
        graphs = graphs_for(names, seed=11)
        before = GraphWriter(driver, db).store_counts()
        fault = threading.Event()
        attempts: list[str] = []

        def hook(stage: str, rows: int) -> None:
            if stage == "edges" and attempts and attempts[-1] == graphs[FAULT_AT][0]["id"] and not fault.is_set():
                fault.set()
                time.sleep(5)  # the transaction stays open while the server is killed under it

        writer = GraphWriter(driver, db, batch_size=8, after_batch=hook)
        writer.ensure_schema()
        downtime: list[float] = []

        def restart_on_fault() -> None:
            if fault.wait(120):
                downtime.append(kill_and_restart(local_neo4j_server, port, hard=True))

        restarter = threading.Thread(target=restart_on_fault)
        restarter.start()

        def tracked() -> Iterator[Graph]:
            for g in graphs:
                attempts.append(g[0]["id"])
                yield g

        try:
            if pipelined:
                writer.write_prompts(tracked())  # returns once the aggregator has added every prompt
            else:
                for g in tracked():
                    writer.write_prompt(*g)
        finally:
            restarter.join(240)
        assert fault.is_set() and downtime, "the fault was never injected"

        faulted = store_state(driver, db, names, graphs)
        n_nodes = sum(g[1].num_rows for g in graphs)
        n_edges = sum(g[2].num_rows for g in graphs)
        assert faulted[0] == StoreCounts(before.prompts + N_PROMPTS, before.instance_nodes + n_nodes,
                                         before.edges + n_edges)  # fmt: skip
        assert clean_rerun_state(driver, db, names, graphs) == faulted


def test_short_retry_budget_raises_clearly_and_a_rerun_completes(
    local_neo4j_server: LocalNeo4jServer, neo4j_connection: Neo4jConnection, names: Names
) -> None:
    port = urlparse(neo4j_connection.uri).port
    assert port is not None
    db = neo4j_connection.database
    auth = (neo4j_connection.user, neo4j_connection.password)
    graphs = graphs_for(names, seed=12)
    with GraphDatabase.driver(neo4j_connection.uri, auth=auth, max_transaction_retry_time=2) as driver:
        before = GraphWriter(driver, db).store_counts()
        writer = GraphWriter(driver, db)
        writer.write_prompts(graphs[:FAULT_AT])
        local_neo4j_server.stop()
        try:
            with pytest.raises(StoreUnavailableError, match="was not written: Neo4j is unreachable"):
                writer.write_prompts(graphs)  # the whole loop again, as an ingest rerun would
        finally:
            local_neo4j_server.start(port=port)
        writer.write_prompts(graphs)  # the rerun: idempotent, completes
        faulted = store_state(driver, db, names, graphs)
        n_nodes = sum(g[1].num_rows for g in graphs)
        n_edges = sum(g[2].num_rows for g in graphs)
        assert faulted[0] == StoreCounts(before.prompts + N_PROMPTS, before.instance_nodes + n_nodes,
                                         before.edges + n_edges)  # fmt: skip
        assert clean_rerun_state(driver, db, names, graphs) == faulted


def test_neo4j_down_is_a_clear_error_for_the_writer(names: Names) -> None:
    uri = f"bolt://127.0.0.1:{free_loopback_port()}"  # nothing listens there
    with GraphDatabase.driver(uri, auth=("neo4j", "x"), max_transaction_retry_time=1, connection_timeout=2) as driver:
        writer = GraphWriter(driver)
        with pytest.raises(StoreUnavailableError, match="schema could not be checked: Neo4j is unreachable"):
            writer.write_prompt(*make_graph(names, names.prompt("down")))
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            writer.delete_prompt("anything")
