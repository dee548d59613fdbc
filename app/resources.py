"""Long-lived, shared resources of the app, cached with `st.cache_resource` (one per process, all sessions).

- The Neo4j `Driver` is thread-safe; every query opens its own short session (see `app.store`).
- DuckDB is opened read-only per call by `AtlasStore`, so no connection is shared between threads.
- A `ModelBundle` (model + transcoders) is shared, but a TransformerLens model with hooks is not safe to run from two
  threads at once, so every run holds the bundle's lock.

This module also owns `show_error`, the one place that turns exceptions into readable `st.error` messages.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st
from neo4j import Driver, GraphDatabase
from neo4j.exceptions import AuthError, Neo4jError, ServiceUnavailable

from app.config import AppConfig, load_config
from app.store import AtlasStore


class ConnectionProblem(RuntimeError):
    """The graph store cannot be reached; the message says what to do."""


def config() -> AppConfig:
    return load_config()


@st.cache_resource(show_spinner="Connecting to Neo4j…")
def _driver(uri: str, user: str, password: str) -> Driver:
    driver = GraphDatabase.driver(uri, auth=(user, password), connection_timeout=5.0)
    try:
        driver.verify_connectivity()
    except Exception:
        driver.close()
        raise
    return driver


def neo4j_target(cfg: AppConfig) -> tuple[str, str, str]:
    """`(uri, user, password)`: the configured URI, else the running managed local server."""
    if cfg.neo4j_uri:
        return cfg.neo4j_uri, cfg.neo4j_user, cfg.neo4j_password
    from atlas.storage.neo4j_server import LocalNeo4jServer

    connection = LocalNeo4jServer().connection()
    if connection is None:
        raise ConnectionProblem(
            "no Neo4j to read: the managed local server is not running (start it with `atlas db start`) and "
            "NEO4J_URI / --neo4j-uri is not set"
        )
    return connection.uri, connection.user, connection.password


def driver(cfg: AppConfig) -> Driver:
    uri, user, password = neo4j_target(cfg)
    try:
        return _driver(uri, user, password)
    except AuthError as err:
        raise ConnectionProblem(f"Neo4j at {uri} refused the credentials for user {user!r}: {err.message}") from err
    except (ServiceUnavailable, OSError) as err:
        raise ConnectionProblem(f"Neo4j at {uri} does not answer ({err}); is the server running?") from err


def console_driver(cfg: AppConfig) -> Driver:
    """The Cypher console's connection: the read-only user of `ATLAS_CONSOLE_NEO4J_USER` when set, else the app's."""
    if not cfg.console_user:
        return driver(cfg)
    uri, _, _ = neo4j_target(cfg)
    try:
        return _driver(uri, cfg.console_user, cfg.console_password)
    except AuthError as err:
        raise ConnectionProblem(
            f"Neo4j at {uri} refused the console user {cfg.console_user!r} (ATLAS_CONSOLE_NEO4J_USER): {err.message}"
        ) from err
    except (ServiceUnavailable, OSError) as err:
        raise ConnectionProblem(f"Neo4j at {uri} does not answer ({err}); is the server running?") from err


def store(cfg: AppConfig | None = None) -> AtlasStore:
    cfg = cfg or config()
    return AtlasStore(driver(cfg), cfg.neo4j_database, cfg.stats_db, timeout_s=max(cfg.query_timeout_s, 30.0))


@dataclass
class ModelBundle:
    """A loaded model and transcoder stack; `lock` serialises runs (hooks are per-model state)."""

    model: Any  # atlas.models.LoadedModel
    transcoder: Any  # atlas.transcoders.base.EncoderStack
    model_name: str
    transcoder_path: str
    lock: threading.Lock = field(default_factory=threading.Lock)


@st.cache_resource(show_spinner="Loading model and transcoders…", max_entries=2)
def model_bundle(model_name: str, transcoder_path: str) -> ModelBundle:
    from atlas.models import load_model
    from atlas.transcoders import load_transcoder

    transcoder = load_transcoder(Path(transcoder_path))
    model = load_model(model_name)
    return ModelBundle(model, transcoder, model_name, transcoder_path)


def show_error(err: BaseException, what: str = "") -> None:
    """A readable one-paragraph error (never a traceback)."""
    prefix = f"{what}: " if what else ""
    if isinstance(err, Neo4jError):
        message = f"Neo4j {(err.code or 'error').rsplit('.', 1)[-1]}: {err.message}"
    else:
        message = str(err) or type(err).__name__
    st.error(f"{prefix}{message}", icon=":material/error:")
