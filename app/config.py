"""Where the app reads from: Neo4j, the DuckDB statistics file, the model and transcoders, and query limits.

Settings come from environment variables (set by `atlas app` from its flags, or by the user before `streamlit run`):

    ATLAS_NEO4J_URI / NEO4J_URI, NEO4J_USER, NEO4J_PASSWORD, NEO4J_DATABASE   the graph store
    ATLAS_STATS_DB                                                          feature statistics (DuckDB, read-only)
    ATLAS_MODEL, ATLAS_TRANSCODERS                                          model + transcoders for interventions
    ATLAS_QUERY_TIMEOUT_S, ATLAS_ROW_CAP, ATLAS_CONSOLE_MAX_MB             Cypher console limits
    ATLAS_CONSOLE_NEO4J_USER, ATLAS_CONSOLE_NEO4J_PASSWORD                  a read-only user for the console
    ATLAS_READ_ONLY                                                         1/true: no label edits (`--read-only`)
    ATLAS_LABEL_AUTHOR                                                      author name recorded with label edits

Label edits (`atlas.storage.labels.write_user_labels`, the app's only write) are on by default: `atlas app` is a
researcher's own tool on their own store, and naming features is part of reading it. A shared deployment turns them
off with `--read-only` / `ATLAS_READ_ONLY=1` (docker compose's app service does), so that readers cannot change what
others see.

The console connects as `ATLAS_CONSOLE_NEO4J_USER` when it is set (a user the server restricts to reading: Enterprise
or Aura roles, or a user-supplied server); otherwise it shares the app's connection, which on the managed Community
server is the admin user (Community has no roles; see the README on what the console's guard does and does not do).

Without a URI the app uses the managed local Neo4j server (`atlas db start`), reading its port and password from the
server's state file, as every other command does. This module only resolves settings: it opens no connection and
imports no Streamlit, so it is testable and cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from atlas.config import DEFAULT_MODEL, cache_dir
from atlas.storage.neo4j_server import ENV_DATABASE, ENV_PASSWORD, ENV_URI, ENV_USER, NEO4J_USER, URI_SCHEMES

ENV_APP_NEO4J_URI = "ATLAS_NEO4J_URI"
ENV_STATS_DB = "ATLAS_STATS_DB"
ENV_MODEL = "ATLAS_MODEL"
ENV_TRANSCODERS = "ATLAS_TRANSCODERS"
ENV_QUERY_TIMEOUT = "ATLAS_QUERY_TIMEOUT_S"
ENV_ROW_CAP = "ATLAS_ROW_CAP"
ENV_CONSOLE_MAX_MB = "ATLAS_CONSOLE_MAX_MB"
ENV_CONSOLE_USER = "ATLAS_CONSOLE_NEO4J_USER"
ENV_CONSOLE_PASSWORD = "ATLAS_CONSOLE_NEO4J_PASSWORD"
ENV_READ_ONLY = "ATLAS_READ_ONLY"
ENV_LABEL_AUTHOR = "ATLAS_LABEL_AUTHOR"

DEFAULT_QUERY_TIMEOUT_S = 15.0
DEFAULT_ROW_CAP = 1000
DEFAULT_CONSOLE_MAX_MB = 32.0


class ConfigError(ValueError):
    """A setting has a value the app cannot use; the message names the variable."""


def default_stats_db() -> Path:
    """The statistics database of the managed local store (`<cache>/store/feature_stats.duckdb`, where ingest
    writes it by default)."""
    return cache_dir() / "store" / "feature_stats.duckdb"


@dataclass(frozen=True)
class AppConfig:
    """Everything the pages need to reach the store and the model. `neo4j_uri` None: the managed local server."""

    neo4j_uri: str | None
    neo4j_user: str
    neo4j_password: str
    neo4j_database: str
    stats_db: Path
    model: str
    transcoders: Path | None
    query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S
    row_cap: int = DEFAULT_ROW_CAP
    console_max_mb: float = DEFAULT_CONSOLE_MAX_MB  # bytes of one console result; a single value may use a quarter
    console_user: str | None = None  # None: the console shares the app's connection
    console_password: str = ""
    read_only: bool = False  # True: label edits are off (a shared deployment)
    label_author: str | None = None  # recorded with label edits


def _positive(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as err:
        raise ConfigError(f"{name}={raw!r} is not a number") from err
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} must be positive")
    return value


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={raw!r}: expected 1/true/yes/on or 0/false/no/off")


def load_config(environ: Mapping[str, str] | None = None) -> AppConfig:
    """Settings from `environ` (default `os.environ`); raises `ConfigError` naming a bad variable."""
    env = os.environ if environ is None else environ
    uri = (env.get(ENV_APP_NEO4J_URI) or env.get(ENV_URI) or "").strip() or None
    if uri is not None and uri.split("://", 1)[0].lower() not in URI_SCHEMES:
        raise ConfigError(f"Neo4j URI {uri!r}: expected a bolt:// or neo4j:// URI")
    transcoders = (env.get(ENV_TRANSCODERS) or "").strip()
    return AppConfig(
        neo4j_uri=uri,
        neo4j_user=env.get(ENV_USER) or NEO4J_USER,
        neo4j_password=env.get(ENV_PASSWORD, ""),
        neo4j_database=env.get(ENV_DATABASE) or "neo4j",
        stats_db=Path(env.get(ENV_STATS_DB) or default_stats_db()).expanduser(),
        model=(env.get(ENV_MODEL) or "").strip() or DEFAULT_MODEL,
        transcoders=Path(transcoders).expanduser() if transcoders else None,
        query_timeout_s=_positive(env, ENV_QUERY_TIMEOUT, DEFAULT_QUERY_TIMEOUT_S),
        row_cap=int(_positive(env, ENV_ROW_CAP, DEFAULT_ROW_CAP)),
        console_max_mb=_positive(env, ENV_CONSOLE_MAX_MB, DEFAULT_CONSOLE_MAX_MB),
        console_user=(env.get(ENV_CONSOLE_USER) or "").strip() or None,
        console_password=env.get(ENV_CONSOLE_PASSWORD, ""),
        read_only=_flag(env, ENV_READ_ONLY),
        label_author=(env.get(ENV_LABEL_AUTHOR) or "").strip() or None,
    )


def environment_for(
    *,
    neo4j_uri: str | None = None,
    stats_db: Path | None = None,
    model: str | None = None,
    transcoders: Path | None = None,
    read_only: bool = False,
    label_author: str | None = None,
) -> dict[str, str]:
    """Environment variables that make `load_config` return these settings (for `atlas app` and tests)."""
    out: dict[str, str] = {}
    if neo4j_uri:
        out[ENV_APP_NEO4J_URI] = neo4j_uri
    if stats_db is not None:
        out[ENV_STATS_DB] = str(stats_db)
    if model:
        out[ENV_MODEL] = model
    if transcoders is not None:
        out[ENV_TRANSCODERS] = str(transcoders)
    if read_only:
        out[ENV_READ_ONLY] = "1"
    if label_author:
        out[ENV_LABEL_AUTHOR] = label_author
    return out
