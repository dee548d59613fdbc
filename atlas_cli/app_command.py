"""`atlas app`: checks the app's settings, then replaces this process with `streamlit run app/main.py`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from atlas_cli.common import TRANSCODERS_HELP, console, fail, transcoder_directory


def app_command(
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port the app serves on (loopback and LAN, as Streamlit does).")
    ] = 8501,
    neo4j_uri: Annotated[
        str | None, typer.Option(help="bolt:// or neo4j:// URI (default: NEO4J_URI, else the managed local server).")
    ] = None,
    stats_db: Annotated[Path | None, typer.Option(help="DuckDB feature statistics (default: managed store).")] = None,
    model: Annotated[str | None, typer.Option(help="Model for interventions (default: each prompt's model).")] = None,
    transcoders: Annotated[str | None, typer.Option(help="Transcoders for interventions: " + TRANSCODERS_HELP)] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="No label edits (for a shared deployment; default: edits on).")
    ] = False,
    author: Annotated[str | None, typer.Option(help="Author name recorded with label edits.")] = None,
) -> None:
    """Open the Streamlit atlas app: overview, features, prompt graphs, paths, Cypher console, interventions."""
    import importlib.util
    import os

    from app.config import ConfigError, environment_for, load_config

    transcoder_dir = None if transcoders is None else transcoder_directory(transcoders)
    settings = environment_for(neo4j_uri=neo4j_uri, stats_db=stats_db, model=model, transcoders=transcoder_dir,
                               read_only=read_only, label_author=author)  # fmt: skip
    env = {**os.environ, **settings}
    try:
        load_config(env)
    except ConfigError as err:
        fail(err)
    spec = importlib.util.find_spec("app")
    if spec is None or not spec.submodule_search_locations:
        fail(RuntimeError("the `app` package is not installed with circuit-atlas"))
    script = Path(next(iter(spec.submodule_search_locations))) / "main.py"
    argv = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port), "--server.headless",
            "true", "--browser.gatherUsageStats", "false", "--client.showErrorDetails", "none",
            "--client.toolbarMode", "minimal"]  # fmt: skip
    console.print(f"atlas app on http://localhost:{port}")
    os.execve(sys.executable, argv, env)


def register(app: typer.Typer) -> None:
    """Add `app` to the root `atlas` app."""
    app.command("app")(app_command)
