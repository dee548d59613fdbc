"""Pytest plugin: one Neo4j server per test session, from the cheapest source available.

Order: `NEO4J_URI` (an existing server) -> testcontainers, if a Docker engine answers -> a `LocalNeo4jServer` whose
jars are shared in the user cache (installed once) and whose instance lives in a session temp dir.
Register with `pytest_plugins = ["neo4j_fixtures"]` or `-p neo4j_fixtures`.
"""

from __future__ import annotations

import importlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from neo4j import Driver, GraphDatabase

from atlas.storage.neo4j_server import LocalNeo4jServer, Neo4jConnection, resolve_connection

# Same LTS line as the local server (`NEO4J_VERSION`); the minor tag exists on Docker Hub.
NEO4J_DOCKER_IMAGE = "neo4j:5.26-community"


@dataclass(frozen=True)
class Neo4jBackend:
    """The session's server: how to reach it, and the local server object when we started one ourselves."""

    connection: Neo4jConnection
    kind: str  # "env", "testcontainers" or "local"
    local_server: LocalNeo4jServer | None = None


def docker_available(timeout_s: float = 2.0) -> bool:
    """Whether a Docker engine answers a ping (any failure, including a missing SDK, means no)."""
    try:
        # Via importlib: the repository's own `docker/` folder would shadow the SDK for mypy.
        docker = importlib.import_module("docker")
        client = docker.from_env(timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@pytest.fixture(scope="session")
def neo4j_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Neo4jBackend]:
    connection = resolve_connection()
    if connection is not None:
        yield Neo4jBackend(connection, "env")
        return
    if docker_available():
        from testcontainers.community.neo4j import Neo4jContainer

        password = secrets.token_urlsafe(16)
        with Neo4jContainer(image=NEO4J_DOCKER_IMAGE, username="neo4j", password=password) as container:
            uri = container.get_connection_url()
            yield Neo4jBackend(Neo4jConnection(uri=uri, user="neo4j", password=password), "testcontainers")
        return
    server = LocalNeo4jServer(instance_dir=tmp_path_factory.mktemp("neo4j-instance"))
    try:
        connection = server.start()
        yield Neo4jBackend(connection, "local", server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def neo4j_connection(neo4j_backend: Neo4jBackend) -> Neo4jConnection:
    return neo4j_backend.connection


@pytest.fixture(scope="session")
def local_neo4j_server(neo4j_backend: Neo4jBackend) -> LocalNeo4jServer:
    """The session's `LocalNeo4jServer`; skips when the session uses `NEO4J_URI` or a container instead."""
    if neo4j_backend.local_server is None:
        pytest.skip(f"the session's Neo4j comes from {neo4j_backend.kind}, not LocalNeo4jServer")
    return neo4j_backend.local_server


@pytest.fixture(scope="session")
def neo4j_driver(neo4j_connection: Neo4jConnection) -> Iterator[Driver]:
    driver = GraphDatabase.driver(neo4j_connection.uri, auth=(neo4j_connection.user, neo4j_connection.password))
    try:
        yield driver
    finally:
        driver.close()
