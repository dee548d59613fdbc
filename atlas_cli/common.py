"""What every `atlas` command shares: the stderr console, the one-line error exit, and the errors a user can fix.

Errors the user can fix are printed as one readable line and exit with status 2, without a traceback. Numeric options
are range-checked by Typer (`min=`/`max=` on the option) before any command body runs, so a bad value costs no import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)

TRANSCODERS_HELP = (
    "Transcoder directory (circuit-tracer format), or a published dictionary: a Hugging Face repo id"
    " (owner/repo\\[/subfolder]\\[@revision]) or a preset name such as gemma, llama, qwen3-0.6b."
)


def transcoder_directory(source: str) -> Path:
    """The local directory of `--transcoders`: the path itself, or a published dictionary resolved through the
    Hugging Face cache (`atlas.transcoders.hub`); a clear one-line error when it is neither."""
    from atlas.transcoders.hub import resolve_transcoders

    try:
        return resolve_transcoders(source)
    except user_errors() as err:
        fail(err)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that carry a message meant for the user (imported lazily: they live beside heavy modules)."""
    from atlas.models.loading import ModelLoadError
    from atlas.training.corpus import CorpusError
    from atlas.training.trainer import TrainingError
    from atlas.transcoders import TranscoderFormatError, TranscoderShapeError

    return (
        ModelLoadError,
        CorpusError,
        TrainingError,
        TranscoderFormatError,
        TranscoderShapeError,
        ValueError,
    )


def store_driver(*, start: bool = False) -> tuple[Any, str]:
    """(Neo4j driver, database) on `NEO4J_URI`, else the managed local server: the running one, or (`start`) one
    started when needed. Without a server, one red line and exit 2. The caller closes the driver."""
    from neo4j import GraphDatabase

    from atlas.storage.neo4j_server import LocalNeo4jServer, Neo4jServerError, resolve_connection

    try:
        connection = resolve_connection()
        if connection is None:
            connection = LocalNeo4jServer().start() if start else LocalNeo4jServer().connection()
    except (Neo4jServerError, ValueError) as err:
        fail(err)
    if connection is None:
        fail(ValueError("no Neo4j: set NEO4J_URI, or start the managed server with `atlas db start`"))
    return GraphDatabase.driver(connection.uri, auth=(connection.user, connection.password)), connection.database


def fail(err: BaseException) -> NoReturn:
    """Print `err` as one red line and exit with status 2."""
    console.print(f"[bold red]error:[/] {escape(str(err))}")  # messages may hold brackets, e.g. "[/subfolder]"
    raise typer.Exit(code=2)


def unit_fraction(value: float | None) -> float | None:
    """Typer callback for options that are fractions in (0, 1] (pruning thresholds); None passes through."""
    if value is not None and not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"must be in (0, 1], got {value}")
    return value
